"""The report assembled from what the stages stored: the analysis, the steering and the explanation files, and
the stage manifests, into the versioned schema (validated on construction, then once more as readers parse it).
"""

from __future__ import annotations

import statistics
from typing import Any

from dfc.analysis.null import NullCalibration, NullVerdict, judge
from dfc.analysis.ranking import RankingWeights
from dfc.behaviour.divergence import RemovalScreen
from workers.pipeline.status import AuditStatus, now
from workers.report.checks import calibration_for, finding_statistics, null_checks
from workers.report.schema import (
    AlignmentSummary,
    AuditReport,
    ChecksCalibration,
    Context,
    Continuation,
    CorpusInfo,
    CrosscoderInfo,
    Divergence,
    DivergentContext,
    DivergentToken,
    EnsembleInfo,
    Explanation,
    FalsePositiveChecks,
    FeatureLink,
    FeatureReport,
    FeatureStats,
    Histogram,
    ModelInfo,
    ScanExample,
    ScanInfo,
    SeedEvidence,
    SharedFeature,
    SharedSummary,
    SteeringResult,
    SteeringTransfer,
    TokenValue,
    TrainingMetrics,
    TransferComponent,
)
from workers.spec import AuditSpec


def _clamp(value: float, low: float = 0.0, high: float = 1.0) -> float:
    return min(high, max(low, float(value)))


def _contexts(records: list[dict[str, Any]]) -> list[Context]:
    return [
        Context(doc_id=str(c["doc_id"]), prefix=c["prefix"], token=c["token"], suffix=c["suffix"],
                activation=max(0.0, c["activation"]))
        for c in records
    ]  # fmt: skip


def _tokens(effects: dict[str, Any] | None, which: str) -> list[TokenValue]:
    if effects is None:
        return []
    names = effects[f"{which}_tokens"] or [str(i) for i in effects[f"{which}_ids"]]
    return [TokenValue(token=t, value=v) for t, v in zip(names, effects[f"{which}_values"], strict=True)]


def _continuations(prompts: list[str], unsteered: list[str], steered: list[str],
                   unsteered_tokens: list[list[str]] | None, steered_tokens: list[list[str]] | None,
                   ) -> list[Continuation]:  # fmt: skip
    """Side-by-side generations; the per-token lists are optional (steer data written before they were recorded)."""
    none: list[None] = [None] * len(prompts)
    return [
        Continuation(prompt=prompt, unsteered=before, steered=after, unsteered_tokens=before_tokens,
                     steered_tokens=after_tokens)
        for prompt, before, after, before_tokens, after_tokens in zip(
            prompts, unsteered, steered, unsteered_tokens or none, steered_tokens or none, strict=True)
    ]  # fmt: skip


def _steering_results(steered: dict[str, Any] | None) -> list[SteeringResult]:
    """The additive sweep (α · s_max · d at every position), one result per α, as the schema describes it."""
    if steered is None:
        return []
    sweep = steered["sweeps"]["additive"]
    return [
        SteeringResult(
            alpha=p["alpha"],
            kl_feature_prompts=max(0.0, p["kl_feature"]),
            kl_neutral_prompts=max(0.0, p["kl_neutral"]),
            delta_logprob_promoted=p["promoted_logprob_change"] or 0.0,
            continuations=_continuations(sweep["probe_prompts"], sweep["unsteered"], p["continuations"],
                                         sweep.get("unsteered_tokens"), p.get("continuation_tokens")),
        )
        for p in sweep["points"]
    ]  # fmt: skip


def _divergence(screen: dict[str, Any] | None) -> Divergence | None:
    """The screen's divergence evidence, most divergent promoted tokens first (None when not measured)."""
    if screen is None or screen["divergence"] is None:
        return None
    tokens = [DivergentToken(**c.to_dict()) for c in RemovalScreen.from_dict(screen).most_divergent()]
    return Divergence(nats=screen["divergence"], removal_kl=max(0.0, screen["kl"]), contexts=screen["n_contexts"],
                      tokens=tokens)  # fmt: skip


def _checks(entry: dict[str, Any], record: dict[str, Any], steered: dict[str, Any] | None,
            weights: RankingWeights, null: NullVerdict | None) -> FalsePositiveChecks:  # fmt: skip
    """Latent Scaling and, when steering ran, the null-calibrated checks; ``passed`` needs both."""
    flags = []
    nu_eps, nu_r = entry["nu_eps"], entry["nu_r"]
    # The thresholds the ranking held this feature to (same-space or cross-space), else the same-space ones.
    eps_max = entry.get("nu_eps_max") if entry.get("nu_eps_max") is not None else weights.nu_eps_max
    r_max = entry.get("nu_r_max") if entry.get("nu_eps_max") is not None else weights.nu_r_max
    if nu_eps is not None and nu_eps >= eps_max:
        flags.append(f"Latent Scaling ν_ε = {nu_eps:.2f}: the other model's reconstruction error carries this "
                     "feature too (it may not be exclusive)")  # fmt: skip
    if nu_r is not None and r_max is not None and nu_r >= r_max:
        flags.append(f"Latent Scaling ν_r = {nu_r:.2f}: the other model reconstructs it through other latents")
    if nu_eps is None or nu_r is None:
        flags.append("Latent Scaling could not be computed for this feature")
    cosine = record["nearest_shared_cosine"]
    if cosine is not None and cosine >= 0.7:
        flags.append(f"its decoder is close to shared feature {record['nearest_shared']} (cos {cosine:.2f}): "
                     "possibly an analogue of a shared concept rather than a new one")  # fmt: skip
    if len(record["contexts"]) < 3:
        flags.append(f"fires in only {len(record['contexts'])} document(s) of the analysed text")
    if steered is not None and steered["random_control"]["comparable"]:
        flags.append(f"a random direction of the same size changes the model about as much when steered "
                     f"(median KL ratio {steered['random_control']['median_ratio']:.2f})")  # fmt: skip
    rows = [] if null is None else null_checks(null)
    flags.extend(f"below the null: {row.text}" for row in rows if row.passed is False)
    return FalsePositiveChecks(
        # Negative ratios (the other model anti-correlates) are as exclusive as 0; the schema keeps ν ≥ 0.
        nu_eps=None if nu_eps is None else max(0.0, nu_eps),
        nu_r=None if nu_r is None else max(0.0, nu_r),
        nu_eps_threshold=eps_max,
        nu_r_threshold=r_max,
        passed=entry["passes_latent_scaling"] is True and (null is None or null.passed),
        null_checks=rows,
        nearest_shared_feature=record["nearest_shared"],
        nearest_shared_cosine=None if cosine is None else _clamp(cosine, -1.0, 1.0),
        flags=flags,
    )


def _explanation(entry: dict[str, Any] | None, explainer: str) -> Explanation | None:
    if entry is None:
        return None
    return Explanation(text=entry["text"], explainer=explainer, detection_score=entry["detection_score"],
                       detection_contexts=entry["detection_contexts"])  # fmt: skip


def first_of_each_cluster(entries: list[dict[str, Any]], records: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """``entries`` (ranked, best first) with only the best of the findings matched across seeds (a record's
    ``cluster``): the ensemble's findings, deduplicated. Records of one seed, or before ensembles, have none."""
    seen: set[int] = set()
    out = []
    for entry in entries:
        cluster = records[entry.get("key", entry["feature"])].get("cluster")
        if cluster is None or cluster not in seen:
            out.append(entry)
        if cluster is not None:
            seen.add(cluster)
    return out


def feature_reports(side: str, analysis: dict[str, Any], steering: dict[str, Any] | None, weights: RankingWeights,
                    explanations: dict[str, Any] | None = None,
                    calibration: NullCalibration | None = None) -> list[FeatureReport]:  # fmt: skip
    """One model's reported features in final order (steering-aware when steering ran), ranked 1..n; with a
    calibration, each checked against the null (only where steering ran: the checks read its measurements)."""
    records = {r.get("key", r["feature"]): r for r in analysis["features"][side]}
    steer_side = (steering or {}).get("sides", {}).get(side)
    order = first_of_each_cluster(steer_side["ranking"] if steer_side else analysis["features"][side], records)
    steered = {r["feature"]: r for r in steer_side["features"]} if steer_side else {}
    promoted = steer_side["promoted"] if steer_side else {}
    screens = steer_side.get("screens", {}) if steer_side else {}
    explained = (explanations or {}).get("features", {}).get(side, {})
    explainer = (explanations or {}).get("explainer", "")
    null_stats = finding_statistics(steer_side) if steer_side else {}
    out = []
    for rank, entry in enumerate(order, start=1):
        f = entry.get("key", entry["feature"])  # the ensemble key: analysis records carry it, rankings name it
        record = records[f]
        s = record["stats"]
        out.append(FeatureReport(
            index=record["feature"], owner=side.upper(), rank=rank, score=entry["score"],
            score_components=entry["components"], score_weights=entry["weights"],
            stats=FeatureStats(frequency=_clamp(s["frequency"]), mean_activation=min(s["mean_activation"],
                               s["max_activation"]), max_activation=s["max_activation"],
                               variance_share=_clamp(s["variance_share"])),
            top_contexts=_contexts(record["contexts"]), weak_contexts=_contexts(record["weak_contexts"]),
            promoted_tokens=_tokens(promoted.get(str(f)), "top"),
            suppressed_tokens=_tokens(promoted.get(str(f)), "bottom"),
            checks=_checks(entry, record, steered.get(f), weights,
                           None if calibration is None or f not in null_stats else judge(null_stats[f], calibration)),
            steering=_steering_results(steered.get(f)), divergence=_divergence(screens.get(str(f))),
            explanation=_explanation(explained.get(str(f)), explainer),
            run=record.get("run", 0), seed=record.get("seed"), stability=entry.get("stability"),
            seeds=[SeedEvidence(run=m["run"], seed=m["seed"], feature=m["feature"], cosine=_clamp(m["cosine"], -1, 1))
                   for m in record.get("seeds", [])],
        ))  # fmt: skip
    return out


def steering_transfer(data: dict[str, Any] | None) -> SteeringTransfer | None:
    """The report section of a transferred steering vector (None when none was given or it could not be carried)."""
    if data is None or "error" in data:
        return None
    source, target = data["source"].upper(), data["target"].upper()
    notes = []
    if data["kl"] is not None:
        notes.append(f"Next-token KL on the probe prompts in {target}: {data['kl']:.3g} with the transferred vector, "
                     f"{data['kl_random']:.3g} with a random direction of the same norm.")  # fmt: skip
        if data["kl"] < 2 * data["kl_random"]:
            notes.append("That is not clearly more than chance: the behaviour may not have carried over.")
    if data["cosine_with_own_contrast"] is not None:
        notes.append(f"Cosine between the transferred vector and {target}'s own vector from the same contrasting "
                     f"prompts: {data['cosine_with_own_contrast']:.2f}.")  # fmt: skip
    return SteeringTransfer(
        source=source, target=target, vector_name=data["name"],
        components=[TransferComponent(feature=f, weight=_clamp(w, -1.0, 1.0))
                    for f, w in zip(data["features"], data["weights"], strict=True)],
        source_coefficient=data["source_coefficient"], target_coefficient=data["target_coefficient"],
        continuations=_continuations(data["probe_prompts"], data["unsteered"], data["steered"],
                                     data.get("unsteered_tokens"), data.get("steered_tokens")),
        notes=" ".join(notes),
    )  # fmt: skip


def explanation_warnings(explained: dict[str, Any] | None, explanations: dict[str, Any] | None) -> list[str]:
    """What the reader should know about missing explanations, when they were asked for."""
    if explained is None or (explained.get("skipped") and not explained.get("requested")):
        return []
    if explained.get("skipped"):
        return [f"explanations were asked for but not written: {explained['reason']}"]
    out = []
    data = explanations or {}
    if data.get("stopped"):
        out.append(f"explanations are incomplete: the stage stopped asking the explainer {data['stopped']}")
    failures = data.get("failures", [])
    if failures and not data.get("stopped"):
        out.append(f"{len(failures)} feature(s) have no explanation; the first error: {failures[0]['error']}")
    return out


def report_warnings(analysis: dict[str, Any], steering: dict[str, Any] | None, models: dict[str, str]) -> list[str]:
    """Audit-wide caveats a reader needs before trusting the ranking."""
    out = []
    pairs = analysis["pairs"]
    if pairs["train"]:
        out.append(f"feature statistics and contexts come from {pairs['analysed']:,} token pairs, {pairs['train']:,} "
                   "of them from the training text (the held-out text alone was short)")  # fmt: skip
    if analysis["architecture"] != "dfc":
        out.append(
            f"a {analysis['architecture']} crosscoder has no dedicated partitions: exclusive features were "
            "read off relative decoder norms (> 0.8 for A, < 0.2 for B), which misses many (SCIENCE.md §10)"
        )
    for side in ("a", "b"):
        silent = analysis["exclusive"][side] - analysis["fired"][side]
        if silent:
            out.append(f"{silent:,} of {analysis['exclusive'][side]:,} features exclusive to {side.upper()} "
                       f"({models[side]}) never fired on the analysed text and are not ranked")  # fmt: skip
    if steering is None:
        out.append("steering was not run: no causal evidence, and no promoted or suppressed tokens were computed")
        return out
    transfer = steering.get("transfer")
    if transfer is not None and "error" in transfer:
        out.append(f"the steering vector '{transfer['name']}' was not carried from {transfer['source'].upper()} to "
                   f"{transfer['target'].upper()}: {transfer['error']}")  # fmt: skip
    for side, data in steering["sides"].items():
        controls = [f["random_control"] for f in data["features"]]
        comparable = sum(c["comparable"] for c in controls)
        if controls and 2 * comparable >= len(controls):
            ratio = statistics.median(c["median_ratio"] for c in controls)
            out.append(f"the steering effect of a random direction of the same size is comparable for {comparable} of "
                       f"{len(controls)} steered features of {side.upper()} (median KL ratio {ratio:.2f}): additive "
                       "steering there mostly measures the vector's size, not the feature")  # fmt: skip
        if any(not f["neutral_prompts_avoid_feature"] for f in data["features"]):
            out.append(f"some steered features of {side.upper()} fire in every sampled document opening, so their "
                       "'neutral' prompts are not free of them")  # fmt: skip
    return out


def ensemble_info(analysis: dict[str, Any]) -> EnsembleInfo | None:
    """The seed ensemble's summary (None for analyses written before ensembles)."""
    e = analysis.get("ensemble")
    if e is None:
        return None
    sides = [s for s in ("a", "b") if s in e]
    thresholds = [e[s]["threshold"] for s in sides if e[s]["threshold"] is not None]
    return EnsembleInfo(
        runs=e["runs"], seeds=e["seeds"], match_threshold=max(thresholds) if thresholds else None,
        chance_cosine={s.upper(): e[s]["chance_cosine"] for s in sides if e[s]["chance_cosine"] is not None},
        in_every_seed={s.upper(): e[s]["in_every_seed"] for s in sides},
        in_one_seed={s.upper(): e[s]["in_one_seed"] for s in sides},
    )  # fmt: skip


def divergent_contexts(scan: dict[str, Any] | None, reported: dict[str, set[tuple[int, int]]],
                       calibration: NullCalibration) -> list[DivergentContext] | None:  # fmt: skip
    """The scan's entries of both owners, B's first, each with the features that carry it."""
    if scan is None:
        return None
    out = []
    for side in ("b", "a"):
        for rank, e in enumerate(scan["sides"].get(side, {}).get("entries", []), start=1):
            out.append(DivergentContext(
                owner=side.upper(), rank=rank, context=e["context"], doc_id=str(e["doc"]), text=e["text"],
                p_owner=_clamp(e["p_owner"]), logprob_owner=e["logprob_owner"], logprob_other=e["logprob_other"],
                gap=e["gap"], score=e["score"], occurrences=max(1, e["occurrences"]),
                examples=[ScanExample(doc_id=str(x["doc"]), context=x["context"], gap=x["gap"])
                          for x in e.get("examples", [])],
                features=[FeatureLink(index=f["feature"], run=f["run"], seed=f["seed"], partition=f["partition"],
                                      closes=f["closes"], activation=max(0.0, f["activation"]),
                                      reported=(f["run"], f["feature"]) in reported[side])
                          for f in e.get("features", [])],
                salience=e.get("salience"),
                passes_null=calibration.scan_passes(e["gap"], e.get("salience")),
            ))  # fmt: skip
    return out


def scan_info(scan: dict[str, Any] | None, calibration: NullCalibration) -> ScanInfo | None:
    """How the scan ran (None when it did not)."""
    if scan is None:
        return None
    sides = scan["sides"]
    return ScanInfo(contexts_screened={s.upper(): d["screened"] for s, d in sides.items()},
                    contexts_scored={s.upper(): d["scored"] for s, d in sides.items()}, top_k=scan["top_k"],
                    null_threshold=calibration.scan_salience, null_gap=calibration.scan_gap,
                    seconds=max(0.0, scan["seconds"]))  # fmt: skip


def build_report(audit_id: str, spec: AuditSpec, status: AuditStatus, outputs: dict[str, dict[str, Any]],
                 analysis: dict[str, Any], steering: dict[str, Any] | None, weights: RankingWeights,
                 explanations: dict[str, Any] | None = None, scan: dict[str, Any] | None = None,
                 ) -> AuditReport:  # fmt: skip
    """The audit's report from the stage manifests and the analysis, steering and explanation files; validated on
    construction."""
    extracted, aligned, trained = outputs["extract"], outputs["align"], outputs["train"]
    info = analysis["models"]
    models = {side: ModelInfo(**{k: info[side][k] for k in ModelInfo.model_fields}) for side in ("a", "b")}
    corpus = info["a"].get("corpus", {})
    c = trained["crosscoder"]
    heldout = trained["heldout"]
    dead = trained.get("final_dead_fraction")
    spec_calibration = spec.checks.calibration
    calibration = calibration_for(None if spec_calibration is None else spec_calibration.model_dump())
    reported = {side: {(r.get("run", 0), r["feature"]) for r in analysis["features"][side]} for side in ("a", "b")}
    report = AuditReport(
        audit_id=audit_id,
        created_at=status.created_at,
        finished_at=now(),
        model_a=models["a"],
        model_b=models["b"],
        corpus=CorpusInfo(description=corpus.get("description", spec.corpus.kind), documents=extracted["documents"],
                          hash=corpus.get("hash") or corpus.get("key", "unknown"), tokens=extracted["a"]["n_tokens"]),
        alignment=AlignmentSummary(aligned_sequence_fraction=_clamp(aligned["aligned_sequence_fraction"]),
                                   kept_token_fraction=_clamp(aligned["kept_token_fraction"]),
                                   pairs=aligned["n_pairs"]),
        crosscoder=CrosscoderInfo(
            architecture=c["architecture"], n_features=c["n_features"], k=c["k"], n_a_only=trained["n_a_only"],
            n_b_only=trained["n_b_only"], n_shared=trained["n_shared"], steps=trained["steps"],
            batch_size=trained["batch_size"], lr=trained["lr"], seed=trained["seed"],
            extra={"d_a": c["d_a"], "d_b": c["d_b"], "scale_a": trained["scale_a"], "scale_b": trained["scale_b"],
                   "dead_after_tokens": trained["resolved"]["dead_after_tokens"], "device": trained["device"],
                   "resumed_from_step": trained["resumed_from_step"], "heldout_tokens": heldout["tokens"],
                   "analysed_pairs": analysis["pairs"]["analysed"]},
        ),
        training=TrainingMetrics(
            fve_a=min(1.0, heldout["fve_a"]), fve_b=min(1.0, heldout["fve_b"]), l0=heldout["l0"],
            dead_fraction=_clamp(heldout["dead_fraction"] if dead is None else dead), tokens=trained["tokens"],
            wall_time_s=status.stage_seconds.get("training", trained.get("seconds", trained["wall_time_s"])),
        ),
        spec=spec.model_dump(mode="json"),
        features_a=feature_reports("a", analysis, steering, weights, explanations, calibration),
        features_b=feature_reports("b", analysis, steering, weights, explanations, calibration),
        shared_summary=SharedSummary(
            n_shared=analysis["shared"]["n_shared"], n_alive=analysis["shared"]["n_alive"],
            relative_norm_histogram=Histogram(**analysis["shared"]["histogram"]),
            features=[SharedFeature(index=s["feature"], relative_norm=_clamp(s["relative_norm"]),
                                    frequency=_clamp(s["frequency"]), top_tokens=s["top_tokens"], snippet=s["snippet"])
                      for s in analysis["shared"]["features"]],
        ),
        steering_transfer=steering_transfer((steering or {}).get("transfer")),
        warnings=report_warnings(analysis, steering, {"a": models["a"].id, "b": models["b"].id})
        + explanation_warnings(outputs.get("explain"), explanations),
        checks_calibration=ChecksCalibration(**calibration.to_dict()) if steering else None,
        ensemble=ensemble_info(analysis),
        divergent_contexts=divergent_contexts(scan, reported, calibration),
        scan=scan_info(scan, calibration),
    )  # fmt: skip
    return AuditReport.model_validate_json(report.model_dump_json())  # what readers will parse, checked once more
