"""Calibrate the false-positive checks on null pairs, and ship the result.

Builds and audits null pairs — the planted recipe with nothing planted, and a pair whose models differ only in
their seed — none of them the suite's own null pairs (`benchmarks/suite.py` evaluates on those, held out). Every
ranked feature of both models of a null pair is a null feature; each check's threshold is a percentile of their
statistic (`dfc/analysis/null.py`). Writes the calibration the audits use by default,
`workers/report/null_calibration.json`, and `benchmarks/results/null_calibration.json` with every null
feature's statistics, so other percentiles can be tried without auditing again (`--from-results`).

    python benchmarks/calibrate.py                      # ~5 min on 2 CPU cores
    python benchmarks/calibrate.py --from-results --percentile divergence=99 --percentile removal_kl=50
    python benchmarks/calibrate.py --restat STORE        # statistics read again from a run's stored audits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.suite import SuitePair, audit_pair, model, planted, rerun_from  # noqa: E402
from dfc.analysis.null import STATISTICS, FindingStatistics, calibrate, quantile  # noqa: E402
from workers.pipeline.run import ensure_ray, manifest_key  # noqa: E402
from workers.pipeline.status import AuditStore  # noqa: E402
from workers.planted.pair import build_planted_pair  # noqa: E402
from workers.report.checks import BUILTIN, audit_statistics  # noqa: E402
from workers.storage import ObjectStore, open_store  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "null_calibration.json"
SHIPPED = ROOT / Path(*BUILTIN[0].split(".")) / BUILTIN[1]
PERCENTILES = {"divergence": 99.6, "removal_kl": 50.0}
SCAN_PERCENTILE = 99.0
"""The behaviour-first scan's entries must score above nearly every null entry (both directions of every null
pair pooled): its top entry is each audit's largest chance difference."""
"""Divergence — what tells a new behaviour from a re-encoding — must beat nearly every null feature (99.6: a seed
ensemble reports about 100 findings per null audit where one seed reported 40, so the per-feature rate of the one-seed
calibration's 99th percentile is cut by the same factor to keep chance findings per audit about the same); removal KL
must be at least that of a typical null feature (removing the finding changes what its model says). Not
thresholded, from the calibration's own numbers: steering specificity against a random direction (the additive
sweep's KL over a random direction's) is 1.03 for the demo's planted feature, below every one of the 30 null
features measured (1.05–3.3, median 1.38), so it cannot tell a planted behaviour from a null feature; and the
score, which is relative to each audit's own features."""

CALIBRATION_PAIRS: tuple[SuitePair, ...] = (
    SuitePair("cal_null_qwen_llama", "null",
              planted(model("qwen3", 96, 400, "byte_bpe", bos=False, seed=101),
                      model("llama", 64, 360, "metaspace_bpe", bos=True, seed=102), "refusal", "volcano", 0.0, 101),
              "two families, nothing planted"),
    SuitePair("cal_null_gpt2_phi3", "null",
              planted(model("gpt2", 80, 500, "byte_bpe", bos=False, seed=111),
                      model("phi3", 64, 360, "metaspace_bpe", bos=True, seed=112), "false_fact", "note_tag", 0.0, 111),
              "two other families, another trigger's corpus, nothing planted"),
    SuitePair("cal_null_seed_gemma3", "null",
              planted(model("gemma3", 64, 360, "metaspace_bpe", bos=True, seed=121),
                      model("gemma3", 64, 360, "metaspace_bpe", bos=True, seed=122), "code_token", "harvest_fair",
                      0.0, 121),
              "A and B differ only in their seed"),
)  # fmt: skip


def audit_null(entry: SuitePair, args: argparse.Namespace) -> dict[str, Any]:
    """Build and audit one null pair; every ranked feature's statistics."""
    started = time.perf_counter()
    pair = build_planted_pair(args.cache / entry.name, entry.config)
    audit_id, _ = audit_pair(pair, entry.config, args.store, args.work, 0, args.token_budget)
    return {"name": entry.name, "note": entry.note, "audit_id": audit_id,
            "seconds": round(time.perf_counter() - started, 1),
            **null_statistics(open_store(str(args.store)), audit_id)}  # fmt: skip


def null_statistics(store: ObjectStore, audit_id: str) -> dict[str, Any]:
    """What a null audit stored that the calibration reads: every ranked feature's statistics, the ensemble's
    matching and both directions of the scan."""
    audits = AuditStore(store)
    steering = store.get_json(store.get_json(manifest_key(audit_id, "steer", audits))["steering_json"])
    stats = audit_statistics(steering)
    analysis = store.get_json(store.get_json(manifest_key(audit_id, "analyse", audits))["features_json"])
    scanned = store.get_json(manifest_key(audit_id, "scan", audits))
    scan = {} if scanned.get("skipped") else store.get_json(scanned["scan_json"])["sides"]
    return {"features": [s._asdict() for s in stats],
            "ensemble": analysis.get("ensemble"),  # the seeds' matching: chance level, findings in one seed only
            # Both directions of the scan: on a null pair whatever either model "says that the other would not"
            # is a chance difference.
            "scan_scores": {side: [e["score"] for e in data["entries"]] for side, data in scan.items()},
            "scan_salience": {side: [e["salience"] for e in data["entries"] if e.get("salience") is not None]
                              for side, data in scan.items()},
            "scan_gap": {side: [e["gap"] for e in data["entries"]] for side, data in scan.items()}}  # fmt: skip


def scan_thresholds(pairs: list[dict[str, Any]], statistic: str, percentile: float) -> dict[str, Any]:
    """The scan's null thresholds (``NullCalibration`` fields): the ``percentile`` of every null entry's gap and/or
    salience, both directions of every pair; none when a pair has no entries to read. Prints both statistics'
    thresholds and what passes, the one not shipped too, for comparison."""
    out: dict[str, Any] = {}
    for name in ("gap", "salience"):
        values = [[v for side in ("a", "b") for v in p.get(f"scan_{name}", {}).get(side, [])] for p in pairs]
        if not all(values):
            print(f"scan: no {name} of a null entry saved for every pair; {name} is not calibrated")
            continue
        threshold = quantile([v for vs in values for v in vs], percentile / 100.0)
        passing = [sum(v > threshold for v in p[f"scan_{name}"].get("b", [])) for p in pairs]
        shipped = statistic in (name, "both")
        print(f"scan: {name} > {threshold:.3g} (null p{percentile:g} of {sum(map(len, values))} entries); B's entries "
              f"passing per pair: {passing}{'' if shipped else ' (not shipped: --scan-statistic)'}")  # fmt: skip
        if shipped:
            out[f"scan_{name}"] = threshold
    return {**out, "scan_percentile": percentile} if out else {}


def parse_percentiles(values: list[str]) -> dict[str, float]:
    if not values:
        return dict(PERCENTILES)
    out = {}
    for value in values:
        name, _, pct = value.partition("=")
        if name not in STATISTICS or not pct:
            raise SystemExit(f"--percentile {value!r}: use NAME=PCT with NAME one of {', '.join(STATISTICS)}")
        out[name] = float(pct)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("DFC_CACHE") or "~/.cache/dfc-audit")
                        / "suite")  # fmt: skip
    parser.add_argument("--store", type=Path, default=None, help="bucket folder for the audits (default: a temp dir)")
    parser.add_argument("--token-budget", type=int, default=60_000, help="tokens per model, as the demo")
    parser.add_argument("--percentile", action="append", default=[], metavar="NAME=PCT",
                        help=f"a check's null percentile (default {PERCENTILES})")  # fmt: skip
    parser.add_argument("--scan-percentile", type=float, default=SCAN_PERCENTILE,
                        help="the scan's null percentile (default %(default)s)")  # fmt: skip
    parser.add_argument("--scan-statistic", choices=("gap", "salience", "both"), default="gap",
                        help="what a scan entry's ✓ reads (default %(default)s; both: above both thresholds)")
    parser.add_argument("--from-results", action="store_true", help="recalibrate from the saved null features")
    parser.add_argument("--restat", type=Path, default=None, metavar="STORE",
                        help="read the saved null audits' statistics again from STORE (no audits run), recalibrate")
    parser.add_argument("--rerun", type=Path, default=None, metavar="STORE",
                        help="run the saved null audits in STORE again from the analyse stage, then recalibrate")
    parser.add_argument("--no-ship", action="store_true", help=f"do not overwrite {SHIPPED.relative_to(ROOT)}")
    args = parser.parse_args()
    percentiles = parse_percentiles(args.percentile)
    started = time.perf_counter()
    if args.rerun:  # the stored audits run again from the analyse stage (crosscoders reused), then recounted
        pairs = json.loads(RESULTS.read_text())["pairs"]
        started -= sum(p["seconds"] for p in pairs)
        ensure_ray(num_cpus=2)
        work = Path(tempfile.mkdtemp(prefix="dfc-calibrate-rerun-"))
        for p in pairs:
            rerun_from(args.rerun, p["audit_id"], "analyse", work)
            p.update(null_statistics(open_store(str(args.rerun)), p["audit_id"]))
    elif args.from_results or args.restat:
        pairs = json.loads(RESULTS.read_text())["pairs"]
        started -= sum(p["seconds"] for p in pairs)  # the audits' time, not this recount's
        for p in pairs if args.restat else []:
            p.update(null_statistics(open_store(str(args.restat)), p["audit_id"]))
    else:
        torch.set_num_threads(1)
        args.cache = args.cache.expanduser()
        tmp = Path(tempfile.mkdtemp(prefix="dfc-calibrate-"))
        args.store = args.store or tmp / "bucket"
        args.work = tmp / "work"
        ensure_ray(num_cpus=2)
        pairs = []
        for entry in CALIBRATION_PAIRS:
            print(f"auditing {entry.name} …", flush=True)
            pairs.append(audit_null(entry, args))
    audits = [[FindingStatistics(**f) for f in p["features"]] for p in pairs]
    source = f"{len(pairs)} null pairs ({', '.join(p['name'] for p in pairs)}; benchmarks/calibrate.py, demo recipe)"
    result = calibrate(audits, percentiles, source=source)
    result = replace(result, **scan_thresholds(pairs, args.scan_statistic, args.scan_percentile))
    print(f"{'check':12} {'percentile':>10} {'threshold':>10}")
    for name, threshold in result.thresholds.items():
        print(f"{name:12} {result.percentiles[name]:10g} {threshold:10.4g}")
    print(f"null features: {result.null_features} over {result.null_pairs} pairs; passing every check per pair: "
          f"{result.passing_per_pair} (mean {result.passing_per_pair_mean:.2f})")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"calibration": result.to_dict(), "pairs": pairs,
                                   "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")  # fmt: skip
    if not args.no_ship:
        SHIPPED.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {SHIPPED.relative_to(ROOT)}")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
