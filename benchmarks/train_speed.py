"""Training throughput of the sparse crosscoder vs a plain dense masked implementation: best step and whole run.

Two measures, each against the dense masked baseline (dense ``(2, d, F)`` weights with masks, dense
decoder, autograd backward; ``benchmarks/dense_run.py``):

1. Best round: tokens/s of one training step, the methods interleaved, best of ``--repeats`` rounds.
2. Whole run: tokens/s as the mean over a short run through :func:`dfc.trainer.train` — k annealing,
   AuxK on dead features, dead-feature bookkeeping, checkpoints and data included — beside the same
   run of the baseline, and where the time goes (timed from outside the trainer).

``--paper-scale`` measures d = 4096 per model, F = 131,072, k = 200, batch 2048, bf16 on a CUDA GPU:
best round, a short run and peak memory of the DFC and of the baseline, one at a time.

Prints tables and updates benchmarks/results/train_speed.json (each mode writes its own keys).
Run: python benchmarks/train_speed.py [--paper-scale]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.dense_run import DenseTrainer  # noqa: E402
from benchmarks.memory_model import PeakMemory, training_memory  # noqa: E402
from benchmarks.run_timing import (  # noqa: E402
    PAPER_SCALE,
    SCALED_DOWN,
    Shape,
    release,
    sync,
    whole_run,
    whole_runs,
)
from dfc.config import CrosscoderConfig  # noqa: E402
from dfc.crosscoder import Crosscoder  # noqa: E402
from dfc.dense_reference import DenseReference  # noqa: E402
from dfc.trainer import TrainConfig, Trainer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("standard", "dfc", "dense_baseline")


def matmul_flops_per_s(
    batch: int, d: int, n_features: int, device: torch.device, dtype: torch.dtype, repeats: int
) -> float:
    """The machine's rate on the encoder's own matmul shape."""
    x = torch.randn(batch, d, device=device, dtype=dtype)
    w = torch.randn(n_features, d, device=device, dtype=dtype)
    for _ in range(2):
        x @ w.T
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        x @ w.T
    sync(device)
    return 2 * batch * d * n_features * repeats / (time.perf_counter() - start)


def time_interleaved(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Seconds per step of each function: the best of ``repeats`` rounds, the functions interleaved.

    Interleaving and taking the minimum makes the ratios robust to other load on the machine:
    every method sees the same conditions, and the best round is the least disturbed one.
    """
    for fn in steps.values():
        fn()
        fn()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, fn in steps.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def make_trainer(method: str, shape: Shape, device: torch.device, bf16: bool, **config: Any) -> Trainer | DenseTrainer:
    """A trainer of ``method`` (standard, dfc or dense_baseline) at ``shape``; ``config`` overrides TrainConfig."""
    arch = "standard" if method == "standard" else "dfc"
    model = Crosscoder(
        CrosscoderConfig(d_a=shape.d_a, d_b=shape.d_b, n_features=shape.n_features, k=shape.k, architecture=arch)
    )
    settings: dict[str, Any] = {"steps": 10**6, "k_anneal_steps": 0, "log_every": 0} | config
    train_config = TrainConfig(device=str(device), bf16=bf16, **settings)
    return DenseTrainer(model, train_config) if method == "dense_baseline" else Trainer(model, train_config)


# --------------------------------------------------------------------------- best round of single steps
def best_rounds(shape: Shape, device: torch.device, repeats: int, bf16: bool) -> dict[str, Any]:
    """Best-round tokens/s of one step of each method on the same batch, k fixed, interleaved."""
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(shape.batch, shape.d_a, generator=g), torch.randn(shape.batch, shape.d_b, generator=g)
    trainers = {m: make_trainer(m, shape, device, bf16) for m in METHODS}
    for trainer in trainers.values():
        trainer.step(x_a, x_b)
    # The baseline's weights are the DFC's (same seed, same first batch): the losses must agree.
    dfc_model = trainers["dfc"].model
    with torch.no_grad():
        n_a, n_b = dfc_model.normalize(x_a.to(device), x_b.to(device))
        sparse_loss = float(dfc_model(n_a, n_b, k=shape.k).loss)
        dense_out = DenseReference(dfc_model).to(device)(n_a, n_b, shape.k)
        dense_loss = float(dense_out.loss_a + dense_out.loss_b)
    seconds = time_interleaved(
        {m: (lambda t=t: t.step(x_a, x_b)) for m, t in trainers.items()}, repeats, device
    )
    tokens_per_s = {name: shape.batch / s for name, s in seconds.items()}
    dtype = torch.bfloat16 if bf16 else torch.float32
    rate = matmul_flops_per_s(shape.batch, shape.d_a + shape.d_b, shape.n_features, device, dtype, repeats)
    floor_s = 2 * shape.batch * (shape.d_a + shape.d_b) * shape.n_features / rate
    return {
        "d_a": shape.d_a,
        "d_b": shape.d_b,
        "F": shape.n_features,
        "k": shape.k,
        "batch": shape.batch,
        "tokens_per_s": tokens_per_s,
        "speedup_vs_dense": tokens_per_s["dfc"] / tokens_per_s["dense_baseline"],
        "floor_fraction": floor_s / (shape.batch / tokens_per_s["dfc"]),
        "matmul_tflops": rate / 1e12,
        "loss_relative_difference": abs(sparse_loss - dense_loss) / abs(dense_loss),
    }


# --------------------------------------------------------------------------- a whole run, timed from outside
# --------------------------------------------------------------------------- paper scale (one method at a time)
def best_round_alone(method: str, shape: Shape, device: torch.device, bf16: bool, repeats: int) -> dict[str, Any]:
    """Best-round tokens/s and peak memory of one method's step, alone on the device."""
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(shape.batch, shape.d_a, generator=g), torch.randn(shape.batch, shape.d_b, generator=g)
    trainer = make_trainer(method, shape, device, bf16)
    trainer.step(x_a, x_b)  # initialises and allocates Adam's moments and the gradients
    peak = PeakMemory(device)
    peak.reset()
    seconds = time_interleaved({method: lambda: trainer.step(x_a, x_b)}, repeats, device)[method]
    return {"tokens_per_s": shape.batch / seconds, "step_s": seconds, "peak_memory_bytes": peak.peak()}


def paper_scale(
    shape: Shape,
    *,
    device: torch.device,
    bf16: bool,
    repeats: int,
    steps: int,
    dead_after_tokens: int,
    workdir: Path,
    methods: tuple[str, ...] = ("dfc", "dense_baseline"),
) -> dict[str, Any]:
    """Best round, a short whole run (one final checkpoint) and peak memory of each method, one at a time.

    The methods do not fit on one GPU together at paper scale, so nothing is interleaved; an
    out-of-memory error is recorded as the result of that method.
    """
    config = CrosscoderConfig(d_a=shape.d_a, d_b=shape.d_b, n_features=shape.n_features, k=shape.k)
    resolved = TrainConfig(steps=steps, device=str(device), bf16=bf16).resolved(config)
    assert resolved.aux_k is not None
    result: dict[str, Any] = {"shape": shape._asdict(), "bf16": bf16, "steps": steps, "repeats": repeats}
    for method in methods:
        try:
            best = best_round_alone(method, shape, device, bf16, repeats)
            run = whole_run(
                method,
                shape,
                device=device,
                bf16=bf16,
                steps=steps,
                checkpoint_every=0,
                dead_after_tokens=dead_after_tokens,
                workdir=workdir,
            )
            result[method] = {"best_round": best, "run": run.to_json()}
        except torch.cuda.OutOfMemoryError as error:
            result[method] = {"error": f"out of memory: {error}".splitlines()[0]}
        release(device)
    if "run" in result.get("dfc", {}):
        run = result["dfc"]["run"]
        predicted = training_memory(
            config,
            shape.batch,
            bf16=bf16,
            aux_k=resolved.aux_k,
            n_dead=round(run["dead_fraction"] * shape.n_features),
            device=device.type,
        )
        result["dfc"]["predicted_memory_bytes"] = predicted.components()
        best = result["dfc"]["best_round"]
        result["dfc"]["best_round"]["predicted_memory_bytes"] = training_memory(
            config, shape.batch, bf16=bf16, aux_k=resolved.aux_k, n_dead=0, device=device.type
        ).total
        if device.type == "cuda":  # tensors only, like the prediction; on the CPU it is resident memory
            best["memory_ratio_predicted_over_measured"] = best["predicted_memory_bytes"] / best["peak_memory_bytes"]
    if all("run" in result.get(m, {}) for m in ("dfc", "dense_baseline")):
        result["speedup_vs_dense"] = {
            "best_round": result["dfc"]["best_round"]["tokens_per_s"]
            / result["dense_baseline"]["best_round"]["tokens_per_s"],
            "run": result["dfc"]["run"]["tokens_per_s"] / result["dense_baseline"]["run"]["tokens_per_s"],
        }
    return result


# --------------------------------------------------------------------------- printing and main
def _breakdown_rows(run: dict[str, Any]) -> list[tuple[str, float]]:
    return [
        ("first step (init)", run["first_step_s"]),
        ("steps, k annealing", run["annealing_steps_s"]),
        ("steps, final k", run["settled_steps_s"]),
        ("  of which AuxK fwd", run["auxk_s"] if run["auxk_s"] is not None else math.nan),
        ("data", run["data_s"]),
        (f"checkpoints ({run['checkpoints']})", run["checkpoint_s"]),
        ("other", run["other_s"]),
        ("total", run["seconds"]),
    ]


def print_runs(rows: list[dict[str, Any]]) -> None:
    print("\nwhole run: tokens/s as the mean over the run (k annealing, AuxK, bookkeeping, checkpoints, data)")
    columns = ["d_a", "d_b", "F", "steps", "DFC run", "dense run", "run x", "best x", "DFC best", "dense best"]
    print(" ".join(f"{c:>10}" for c in columns))
    for r in rows:
        run, best = r["run"], r["tokens_per_s"]
        cells = [r["d_a"], r["d_b"], r["F"], run["steps"], f"{run['dfc']['tokens_per_s_mean']:.0f}"]
        cells += [f"{run['dense_baseline']['tokens_per_s_mean']:.0f}", f"{run['speedup_vs_dense']:.2f}x"]
        cells += [f"{r['speedup_vs_dense']:.2f}x", f"{best['dfc']:.0f}", f"{best['dense_baseline']:.0f}"]
        print(" ".join(f"{c:>10}" for c in cells))
    for r in rows:
        print(f"\nwhere the time goes, d_a={r['d_a']} d_b={r['d_b']} (seconds, mean of rounds; share of the run)")
        dfc, dense = (_mean_breakdown(r["run"][m]["rounds"]) for m in ("dfc", "dense_baseline"))
        for (label, dfc_s), (_, dense_s) in zip(dfc, dense, strict=True):
            print(f"  {label:<22} DFC {dfc_s:7.2f} s {100 * dfc_s / dfc[-1][1]:5.1f}%"
                  f"   dense {dense_s:7.2f} s {100 * dense_s / dense[-1][1]:5.1f}%")


def _mean_breakdown(rounds: list[dict[str, Any]]) -> list[tuple[str, float]]:
    tables = [_breakdown_rows(r) for r in rounds]
    return [(label, sum(t[i][1] for t in tables) / len(tables)) for i, (label, _) in enumerate(tables[0])]


def _merge_results(path: Path, update: dict[str, Any]) -> None:
    """Write ``update``'s keys into the JSON at ``path``, keeping the keys other modes wrote."""
    existing = json.loads(path.read_text()) if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing | update, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the issue's setting is 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the best-round measure")
    parser.add_argument("--runs", type=int, default=2, help="interleaved rounds of the whole-run measure")
    parser.add_argument("--steps", type=int, default=60, help="steps of each whole run")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="checkpoint interval of the whole runs")
    parser.add_argument("--dead-after-tokens", type=int, default=None,
                        help="dead-feature window of the whole runs (default: 2 batches, so AuxK runs in a short run)")
    parser.add_argument("--in-turns", action="store_true",
                        help="whole runs take turns step by step (for a loaded machine; see whole_runs)")
    parser.add_argument("--paper-scale", action="store_true",
                        help="d=4096 per model, F=131072, k=200, batch 2048, bf16 on a CUDA GPU")
    parser.add_argument("--scaled-down", action="store_true",
                        help=f"with --paper-scale: run its code path at {SCALED_DOWN._asdict()} (CPU check)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs write their checkpoints")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_average_1min": os.getloadavg()[0],
    }
    if args.paper_scale:
        run_paper_scale(args, device, meta)
        return
    shapes = [Shape(256, 256, 8192, 32, 1024), Shape(256, 384, 8192, 32, 1024)]
    rows = []
    for shape in shapes:
        row = best_rounds(shape, device, args.repeats, bf16=False)
        row["run"] = whole_runs(
            shape,
            device=device,
            bf16=False,
            runs=args.runs,
            steps=args.steps,
            checkpoint_every=args.checkpoint_every,
            dead_after_tokens=args.dead_after_tokens or 2 * shape.batch,
            in_turns=args.in_turns,
        )
        rows.append(row)
    columns = ["d_a", "d_b", "F", "k", "batch", "standard", "dfc", "dense", "speedup", "floor", "Δloss"]
    print(f"device={device} threads={args.threads} bf16=False")
    print("best round: tokens/s of one step, k fixed, best of interleaved rounds")
    print(" ".join(f"{c:>9}" for c in columns))
    for r in rows:
        t = r["tokens_per_s"]
        cells = [r["d_a"], r["d_b"], r["F"], r["k"], r["batch"], f"{t['standard']:.0f}", f"{t['dfc']:.0f}"]
        cells += [f"{t['dense_baseline']:.0f}", f"{r['speedup_vs_dense']:.2f}x", f"{r['floor_fraction']:.2f}"]
        cells += [f"{r['loss_relative_difference']:.1e}"]
        print(" ".join(f"{c:>9}" for c in cells))
    print_runs(rows)
    _merge_results(args.out, {"meta": meta | {"bf16": False}, "configs": rows})
    print(f"wrote {args.out}")


def run_paper_scale(args: argparse.Namespace, device: torch.device, meta: dict[str, Any]) -> None:
    """``--paper-scale``: refuse on a CPU unless ``--scaled-down``; record throughput and peak memory."""
    shape = SCALED_DOWN if args.scaled_down else PAPER_SCALE
    if device.type != "cuda" and not args.scaled_down:
        config = CrosscoderConfig(d_a=shape.d_a, d_b=shape.d_b, n_features=shape.n_features, k=shape.k)
        need = training_memory(config, shape.batch, bf16=True, aux_k=2048, n_dead=0).total
        sys.exit(
            f"--paper-scale needs a CUDA GPU: the DFC alone holds ~{need / 2**30:.0f} GiB (fp32 weights, Adam "
            "moments, gradients, a 2048-token batch) and one step on this CPU would take minutes. Run it on a "
            "GPU machine, or add --scaled-down to run the same code path at a CPU size."
        )
    bf16 = device.type == "cuda"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-speed-paper-"))
    try:
        result = paper_scale(
            shape,
            device=device,
            bf16=bf16,
            repeats=args.repeats,
            steps=30 if not args.scaled_down else 12,
            dead_after_tokens=args.dead_after_tokens or 4 * shape.batch,
            workdir=workdir,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"device={meta['device']} bf16={bf16} shape={shape._asdict()}")
    for method in ("dfc", "dense_baseline"):
        entry = result.get(method, {})
        if "error" in entry:
            print(f"{method:>15}: {entry['error']}")
            continue
        best, run = entry["best_round"], entry["run"]
        print(
            f"{method:>15}: best round {best['tokens_per_s']:9.0f} tok/s, whole run {run['tokens_per_s']:9.0f} tok/s, "
            f"peak memory {best['peak_memory_bytes'] / 2**30:6.2f} GiB (step) {run['peak_memory_bytes'] / 2**30:6.2f} "
            "GiB (run)"
        )
    if "predicted_memory_bytes" in result.get("dfc", {}):
        print(f"predicted DFC step peak {result['dfc']['best_round']['predicted_memory_bytes'] / 2**30:.2f} GiB")
    if "speedup_vs_dense" in result:
        s = result["speedup_vs_dense"]
        print(f"speed-up vs dense: best round {s['best_round']:.2f}x, whole run {s['run']:.2f}x")
    key = "paper_scale_scaled_down" if args.scaled_down else "paper_scale"
    _merge_results(args.out, {key: {"meta": meta | {"bf16": bf16}, **result}})
    print(f"wrote {key} into {args.out}")


if __name__ == "__main__":
    main()
