"""The explain stage: optional LLM explanations of each model's top features, judged by detection
(dfc/analysis/explain.py).

Off unless the spec asks (``explain.enabled``) and the deployment names an endpoint (``DFC_EXPLAINER_*``).
It never fails an audit for the endpoint's sake: the report is complete without explanations, so an endpoint
that is down, refuses the key or answers nonsense ends the stage with what it has and a warning in the report.
Each explanation is stored as soon as it is written (``analysis/explanations.json``), so a resumed audit asks
only for the ones it lacks.
"""

from __future__ import annotations

import logging
from typing import Any

from dfc.analysis.explain import ExplanationError, Snippet, detect, explain
from dfc.behaviour.divergence import RemovalScreen
from workers.analysis.analyse import SIDES
from workers.analysis.data import load_tokenizer, locate_tokens
from workers.analysis.llm import ChatClient, ExplainerError, ExplainerSettings
from workers.pipeline.context import StageContext
from workers.report.build import first_of_each_cluster

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3
"""Features in a row the endpoint failed on before the stage stops asking (it is down, not unlucky)."""
PROMOTED_SHOWN, SAYS_SHOWN = 10, 5


def _order(analysis: dict[str, Any], steering: dict[str, Any] | None, side: str) -> list[int]:
    """The side's reported features in final order: the steer stage's ranking when it ran, else the analysis'."""
    steered = (steering or {}).get("sides", {}).get(side)
    records = {r.get("key", r["feature"]): r for r in analysis["features"][side]}
    entries = first_of_each_cluster(steered["ranking"] if steered else analysis["features"][side], records)
    # Ensemble keys: a ranking entry names one as its feature; an analysis record carries it as "key".
    return [e.get("key", e["feature"]) for e in entries]


def _evidence(steering: dict[str, Any] | None, side: str, feature: int) -> tuple[list[str], list[str]]:
    """The tokens the feature promotes and, most divergent first, what it makes its model say (when measured)."""
    steered = (steering or {}).get("sides", {}).get(side) or {}
    promoted = (steered.get("promoted") or {}).get(str(feature)) or {}
    screen = (steered.get("screens") or {}).get(str(feature)) or {}
    tokens = RemovalScreen.from_dict(screen).most_divergent() if screen else []
    says = list(dict.fromkeys(c.text for c in tokens if c.text and c.text.strip()))
    return list(promoted.get("top_tokens") or [])[:PROMOTED_SHOWN], says[:SAYS_SHOWN]


def _openings(ctx: StageContext, analysis: dict[str, Any], side: str) -> list[tuple[set[int], str]]:
    """The analysis' document openings as text in ``side``'s tokenizer, with the features that fire in each."""
    pool = analysis["neutral_pool"]
    if not pool:
        return []
    extracted = ctx.outputs["extract"][side]
    tok = load_tokenizer(extracted)
    located = locate_tokens(ctx.store, extracted["prefix"], {p[f"index_{side}"] for p in pool})
    out = []
    for p in pool:
        loc = located[p[f"index_{side}"]]
        out.append((set(p["fired"]), tok.decode(loc.token_ids[: loc.position + 1], skip_special_tokens=True)))
    return out


class _Ledger:
    """explanations.json: written after every feature, read back on resume."""

    def __init__(self, ctx: StageContext, model: str) -> None:
        self.ctx, self.key = ctx, ctx.key("analysis/explanations.json")
        previous = ctx.store.get_json(self.key) if ctx.store.exists(self.key) else {}
        self.data: dict[str, Any] = {
            "version": 1,
            "explainer": model,
            "features": previous.get("features", {side: {} for side in SIDES}) if previous.get("explainer") == model
            else {side: {} for side in SIDES},  # another model's explanations are not this audit's
            "failures": [],
            "stopped": None,
        }  # fmt: skip

    def done(self, side: str, feature: int) -> bool:
        return str(feature) in self.data["features"][side]

    def record(self, side: str, feature: int, entry: dict[str, Any]) -> None:
        self.data["features"][side][str(feature)] = entry
        self.save()

    def fail(self, side: str, feature: int, error: Exception) -> None:
        self.data["failures"].append({"side": side, "feature": feature, "error": str(error)})
        self.save()

    def save(self) -> None:
        self.ctx.store.put_json(self.key, self.data)


def explain_stage(ctx: StageContext) -> dict[str, Any]:
    """Explain the top ``explain.top_n`` features of each model and judge each explanation."""
    spec = ctx.spec.explain
    if not spec.enabled:
        return {"skipped": True, "reason": "explain.enabled is false in the audit spec"}
    settings = ExplainerSettings()
    problem = settings.problem()
    if problem:
        log.warning("audit %s asked for explanations, but %s", ctx.audit_id, problem)
        return {"skipped": True, "reason": f"{problem} on the workers", "requested": True}
    client = ChatClient(settings)
    analysis = ctx.store.get_json(ctx.outputs["analyse"]["features_json"])
    steered = ctx.outputs.get("steer", {})
    steering = None if steered.get("skipped", True) else ctx.store.get_json(steered["steering_json"])
    records = {side: {r.get("key", r["feature"]): r for r in analysis["features"][side]} for side in SIDES}
    queue = [(side, f) for side in SIDES for f in _order(analysis, steering, side)[: spec.top_n]]
    ledger = _Ledger(ctx, client.model)
    openings = {side: _openings(ctx, analysis, side) if spec.detection else [] for side in SIDES}
    models = {"a": ctx.spec.model_a.id, "b": ctx.spec.model_b.id}
    consecutive = 0
    for i, (side, f) in enumerate(queue):
        ctx.check_cancelled()
        if ledger.done(side, f):
            continue
        record = records[side][f]
        top = [Snippet(c["prefix"], c["token"], c["suffix"], c["activation"]) for c in record["contexts"]]
        top = top[: spec.contexts]
        if not top:  # never fired on the analysed text: nothing to explain it from
            continue
        promoted, says = _evidence(steering, side, f)
        try:
            text = explain(client, top, promoted, says, owner=f"model {side.upper()} ({models[side]})")
        except (ExplainerError, ExplanationError) as exc:
            ledger.fail(side, f, exc)
            consecutive += 1
            if getattr(exc, "fatal", False) or consecutive >= MAX_CONSECUTIVE_FAILURES:
                ledger.data["stopped"] = f"after {i + 1} of {len(queue)} features: {exc}"
                ledger.save()
                break
            continue
        consecutive = 0
        entry: dict[str, Any] = {"text": text, "detection_score": None, "detection_contexts": None}
        quiet = [t for fired, t in openings[side] if f not in fired and t.strip()][: spec.contexts]
        if spec.detection and len(quiet) < 2:
            entry["detection_skipped"] = f"it fires in all but {len(quiet)} of the sampled document openings"
        elif spec.detection:
            try:
                found = detect(client, text, [s.text for s in top], quiet, seed=ctx.spec.seed + f)
                entry.update(detection_score=found.score, detection_contexts=found.activating + found.random,
                             verdicts=found.predicted, truth=found.truth)  # fmt: skip
            except (ExplainerError, ExplanationError) as exc:  # the explanation stands without its score
                entry["detection_error"] = str(exc)
        ledger.record(side, f, entry)
        ctx.report_progress((i + 1) / len(queue), explained=sum(len(v) for v in ledger.data["features"].values()),
                            explainer_requests=client.requests)  # fmt: skip
    ledger.save()
    ctx.report_progress(1.0, force=True)
    explained = {side: len(ledger.data["features"][side]) for side in SIDES}
    return {
        "skipped": False,
        "explanations_json": ledger.key,
        "explainer": client.model,
        **{f"explained_{side}": n for side, n in explained.items()},
        "failed": len(ledger.data["failures"]),
        "requests": client.requests,
        "tokens": client.tokens,
    }
