"""The scan stage: what each model says that the other would not, found without any feature (SCIENCE.md §11).

Both models read the analysed documents; at every aligned position (a token of each ends at the same character)
the owner's most likely next tokens are screened cheaply against the other model, the most divergent contexts are
scored exactly with the cross-tokenizer scorer (``dfc.behaviour.scan``), deduplicated by what is said and where,
and the best are attributed to the features (exclusive or shared, of any seed) whose removal at that token closes
the gap most. Both directions: B against A, then A against B. One model is in memory at a time (four loads).
Writes ``analysis/scan.json``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, NamedTuple

import torch

from dfc.behaviour.attribution import attribute
from dfc.behaviour.scan import (
    DivergentContext,
    Prediction,
    ScanDocument,
    attach_contexts,
    complete_words,
    divergent_contexts,
    documents_saying,
    owner_predictions,
    salience,
    score_exact,
    screen_under_other,
    select_for_exact,
)
from dfc.crosscoder import Crosscoder
from workers.analysis.analyse import SIDES
from workers.analysis.data import TrainedRun, load_runs, load_tokenizer, locate_tokens, select_pairs
from workers.analysis.steer import OTHER, LoadedModels
from workers.pipeline.context import StageContext
from workers.spec import ScanSpec

ATTRIBUTION_FEATURES = 8
"""Features active at a divergent context offered for removal, per seed (the strongest contributions first)."""
REPORTED_FEATURES = 5
"""Features listed per divergent context."""


class Aligned(NamedTuple):
    """The analysed documents in each direction, and where each aligned pair's activations are stored."""

    documents: dict[str, list[ScanDocument]]
    """Owner → the documents, the owner's tokens first."""
    pairs: dict[tuple[int, int, int], tuple[int, int]]
    """(document, A's position, B's position) → the pair's global token indices in A's and B's shards."""


def _aligned(ctx: StageContext, limit: int | None) -> Aligned:
    """The analysed pairs grouped by document, with each model's tokens of it."""
    extracted = ctx.outputs["extract"]
    pairs = select_pairs(ctx.store, ctx.outputs["align"])
    located = {side: locate_tokens(ctx.store, extracted[side]["prefix"], getattr(pairs, side).tolist())
               for side in SIDES}  # fmt: skip
    by_doc: dict[int, list[tuple[int, int]]] = defaultdict(list)
    ids: dict[int, dict[str, list[int]]] = {}
    stored: dict[tuple[int, int, int], tuple[int, int]] = {}
    for ga, gb in zip(pairs.a.tolist(), pairs.b.tolist(), strict=True):
        la, lb = located["a"][ga], located["b"][gb]
        if la.doc_id != lb.doc_id:
            continue  # alignment pairs tokens within a document; a mismatch is a corrupt index, not a context
        by_doc[la.doc_id].append((la.position, lb.position))
        ids.setdefault(la.doc_id, {"a": la.token_ids, "b": lb.token_ids})
        stored[(la.doc_id, la.position, lb.position)] = (ga, gb)
    docs = sorted(by_doc)[:limit] if limit else sorted(by_doc)
    out: dict[str, list[ScanDocument]] = {}
    for owner in SIDES:
        other = OTHER[owner]
        out[owner] = [
            ScanDocument(
                doc=d,
                owner_ids=torch.tensor(ids[d][owner]),
                other_ids=torch.tensor(ids[d][other]),
                positions=torch.tensor([(p[0], p[1]) if owner == "a" else (p[1], p[0]) for p in by_doc[d]]),
            )
            for d in docs
        ]
    return Aligned(out, stored)


def _candidates(runs: list[TrainedRun], owner: str, x_a: torch.Tensor, x_b: torch.Tensor
                ) -> list[tuple[dict[str, Any], torch.Tensor]]:  # fmt: skip
    """The features active at one paired token that write to the owner: each with the raw-scale vector its
    activation adds to the owner's residual stream there."""
    out = []
    for run in runs:
        cc: Crosscoder = run.crosscoder
        c = cc.config
        with torch.no_grad():
            na, nb = cc.normalize(x_a[None].to(cc.b_enc.device), x_b[None].to(cc.b_enc.device))
            sparse = cc.encode(na, nb, use_thresholds=float(cc.thresholds[0]) > 0)
        cols, values = sparse.cols.tolist(), sparse.values.tolist()
        mine = c.features_a if owner == "a" else c.features_b
        exclusive = c.a_only_features if owner == "a" else c.b_only_features
        scored = []
        for f, act in zip(cols, values, strict=True):
            if f not in mine or act <= 0:
                continue
            direction = cc.decoder_directions(f, raw_scale=True)[0 if owner == "a" else 1]
            assert direction is not None
            vector = direction.cpu() * act
            partition = "shared" if f not in exclusive else f"{owner.upper()}-only"
            scored.append(({"run": run.run, "seed": run.seed, "feature": f, "partition": partition,
                            "activation": float(act)}, vector))  # fmt: skip
        scored.sort(key=lambda item: -float(item[1].norm()))
        out.extend(scored[:ATTRIBUTION_FEATURES])
    return out


class _Progress:
    """The stage's progress: eight steps (four model loads, two directions each), counters as it goes."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx, self.done, self.counters = ctx, 0, {"contexts_screened": 0, "contexts_scored": 0}

    def step(self, **add: int) -> None:
        self.ctx.check_cancelled()
        self.done += 1
        for name, value in add.items():
            self.counters[name] += value
        self.ctx.report_progress(min(1.0, self.done / 8), **self.counters)


def _attribute_entries(ctx: StageContext, models: LoadedModels, owner: str, entries: list[DivergentContext],
                       aligned: Aligned, runs: list[TrainedRun]) -> list[list[dict[str, Any]]]:  # fmt: skip
    """For each entry: the features active at its representative context (every seed's) whose removal there closes
    the gap most."""
    extracted = ctx.outputs["extract"]
    loaded = models.get(owner)
    layer = extracted[owner]["layer_index"]
    places = [(i, e.prediction) for i, e in enumerate(entries)]
    documents = {d.doc: d for d in aligned.documents[owner]}
    pos_a = lambda p: p.owner_position if owner == "a" else p.other_position  # noqa: E731
    pos_b = lambda p: p.other_position if owner == "a" else p.owner_position  # noqa: E731
    wanted = {(p.doc, pos_a(p), pos_b(p)) for _, p in places}
    indices = {w: aligned.pairs[w] for w in wanted if w in aligned.pairs}
    acts = {side: locate_tokens(ctx.store, extracted[side]["prefix"], [g[k] for g in indices.values()],
                                with_activations=True) for k, side in enumerate(SIDES)}  # fmt: skip
    closes: list[dict[Any, list[float]]] = [defaultdict(list) for _ in entries]
    meta: dict[Any, dict[str, Any]] = {}
    for i, p in places:
        place = (p.doc, pos_a(p), pos_b(p))
        if place not in indices:
            continue
        ga, gb = indices[place]
        la, lb = acts["a"][ga], acts["b"][gb]
        assert la.activations is not None and lb.activations is not None
        candidates = _candidates(runs, owner, la.activations[la.position], lb.activations[lb.position])
        if not candidates:
            continue
        keyed = []
        for info, vector in candidates:
            key = (info["run"], info["feature"])
            meta.setdefault(key, info)
            keyed.append((key, vector))
        doc = documents[p.doc]
        try:
            found = attribute(loaded.model, loaded.tokenizer, layer, p, keyed,
                              context_ids=doc.owner_ids[: p.owner_position + 1])  # fmt: skip
        except ValueError:
            continue  # a context whose gap is not positive where the activations were read: nothing to close
        for a in found:
            closes[i][a.key].append(a.closes)
    out = []
    for i in range(len(entries)):
        ranked = sorted(((sum(v) / len(v), k) for k, v in closes[i].items()), key=lambda t: -t[0])
        out.append([{**meta[k], "closes": c} for c, k in ranked[:REPORTED_FEATURES]])
    return out


def _entry_json(e: DivergentContext, features: list[dict[str, Any]], salient: float | None) -> dict[str, Any]:
    p = e.prediction
    return {
        "text": e.text, "score": e.score, "salience": salient, "gap": e.gap, "p_owner": e.prob_owner,
        "logprob_owner": e.logprob_owner,
        "logprob_other": e.logprob_other, "occurrences": e.n_documents, "contexts": e.n_occurrences,
        "doc": p.doc, "owner_position": p.owner_position, "other_position": p.other_position,
        "context": p.context or "", "prediction": p.to_dict(),
        "examples": [{"doc": x.doc, "context": x.context or "", "gap": x.gap} for x in e.examples],
        "features": features,
    }  # fmt: skip


def _predictions(loaded: Any, documents: list[ScanDocument], spec: ScanSpec) -> tuple[list[Prediction], int]:
    """What the loaded model says next at every aligned position, bare spaces completed to their word; and at how
    many positions a text was completed."""
    said = owner_predictions(loaded.model, loaded.tokenizer, documents, top_k=spec.top_k, min_prob=spec.min_prob)
    if not spec.complete_words:
        return said, 0
    done = complete_words(loaded.model, loaded.tokenizer, documents, said, max_steps=spec.complete_words)
    return done, sum(p.texts != q.texts for p, q in zip(said, done, strict=True))


def scan_stage(ctx: StageContext) -> dict[str, Any]:
    """Both directions of the behaviour-first scan; ``analysis/scan.json``."""
    spec = ctx.spec.scan
    if not spec.enabled:
        return {"skipped": True, "reason": "scan.enabled is false in the audit spec"}
    started = time.monotonic()
    aligned = _aligned(ctx, spec.documents)
    documents = aligned.documents
    runs = load_runs(ctx.store, ctx.outputs["train"], ctx.work_dir / "scan")
    models = LoadedModels(ctx)
    progress = _Progress(ctx)
    predictions: dict[str, list[Prediction]] = {}
    screened: dict[str, int] = {}
    # 1. B: what B says everywhere. 2. A: A screens and scores B's, and says its own. 3. B: screens and scores A's,
    # scores its own exactly, attributes its entries. 4. A: scores its own exactly, attributes its entries.
    loaded = models.get("b")
    completed: dict[str, int] = {}
    predictions["b"], completed["b"] = _predictions(loaded, documents["b"], spec)
    screened["b"] = sum(len(d.positions) for d in documents["b"])
    progress.step(contexts_screened=screened["b"])
    selected: dict[str, list[Prediction]] = {}
    saying: dict[str, dict[tuple[bool, str], int]] = {}
    for owner in ("b", "a"):
        other = OTHER[owner]
        loaded = models.get(other)
        if owner == "b":  # A's own predictions while A is loaded
            predictions["a"], completed["a"] = _predictions(loaded, documents["a"], spec)
            screened["a"] = sum(len(d.positions) for d in documents["a"])
            progress.step(contexts_screened=screened["a"])
        rough = screen_under_other(loaded.model, loaded.tokenizer, documents[owner], predictions[owner])
        saying[owner] = documents_saying(rough)
        chosen = select_for_exact(rough, spec.contexts)
        owner_tok = models_tokenizer(ctx, owner)
        chosen = attach_contexts(owner_tok, documents[owner], chosen)
        selected[owner] = score_exact(loaded.model, loaded.tokenizer, chosen, as_owner=False)
        progress.step(contexts_scored=len(selected[owner]))
    entries: dict[str, list[DivergentContext]] = {}
    attributed: dict[str, list[list[dict[str, Any]]]] = {}
    for owner in ("b", "a"):  # B is loaded now (it scored A's texts); then A
        loaded = models.get(owner)
        scored = score_exact(loaded.model, loaded.tokenizer, selected[owner], as_owner=True)
        entries[owner] = divergent_contexts(scored, max_entries=spec.report, documents=saying[owner])
        progress.step()
        top = entries[owner][: spec.attribute]
        attributed[owner] = _attribute_entries(ctx, models, owner, top, aligned, runs) if top else []
        attributed[owner] += [[] for _ in entries[owner][len(top) :]]
        progress.step()
    data = {
        "version": 1,
        "top_k": spec.top_k,
        "seconds": round(time.monotonic() - started, 3),
        "sides": {
            owner: {"screened": screened[owner], "completed": completed[owner], "scored": len(selected[owner]),
                    "entries": [_entry_json(e, f, s) for e, f, s in zip(entries[owner], attributed[owner],
                                                                         salience(entries[owner]), strict=True)]}
            for owner in ("b", "a")
        },
    }  # fmt: skip
    key = ctx.key("analysis/scan.json")
    ctx.store.put_json(key, data)
    ctx.report_progress(1.0, force=True, **progress.counters)
    return {"skipped": False, "scan_json": key, "model_loads": models.loads,
            **{f"entries_{o}": len(entries[o]) for o in ("a", "b")}, **progress.counters}  # fmt: skip


def models_tokenizer(ctx: StageContext, side: str) -> Any:
    """A model's tokenizer alone (the owner's contexts are decoded while the other model is loaded)."""
    return load_tokenizer(ctx.outputs["extract"][side])
