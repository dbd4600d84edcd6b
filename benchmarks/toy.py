"""Ground-truth toy benchmark (paper appendix B.2, SCIENCE.md §7): standard vs DSF vs DFC.

Trains the three crosscoders on the same synthetic two-model world for several dictionary sizes
and seeds, and reports exclusive-concept recall, false positives (shared concept / no concept),
shared-concept recall and FVE as mean ± standard error over seeds. Writes
benchmarks/results/toy.json and toy.png (the paper's Figure 4).

    python benchmarks/toy.py            # CPU default: 512 concepts in d=64, 3 seeds (~15 min on 2 cores)
    python benchmarks/toy.py --paper    # the paper's setting: 2048 concepts in d=256, 5 seeds (GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.metrics import evaluate
from dfc.toy import ToyConfig, ToyWorld, score
from dfc.trainer import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
ARCHS = ("standard", "dsf", "dfc")


def run_one(job: dict) -> dict:
    """Train one crosscoder on one world and score it."""
    torch.set_num_threads(job["threads"])
    world = ToyWorld(ToyConfig(**job["world"]))
    config = CrosscoderConfig(
        d_a=world.config.d_a,
        d_b=world.config.d_b,
        n_features=job["size"],
        k=job["k"],
        architecture=job["arch"],
        a_only=job["partition"],
        b_only=job["partition"],
    )
    model = Crosscoder(config)
    start = time.perf_counter()
    train(
        model,
        world.batches(job["batch"], job["steps"], seed=job["seed"] + 17),
        TrainConfig(
            steps=job["steps"],
            lr=job["lr"],
            dead_after_tokens=job["dead_after_tokens"],
            aux_k=job["aux_k"],
            aux_alpha=job["aux_alpha"],
            seed=job["seed"],
            device=job["device"],
            log_every=0,
        ),
    )
    evaluation = evaluate(model, world.batches(2048, 4, seed=10_000 + job["seed"]))
    s = score(model, world)
    return {
        **{key: job[key] for key in ("arch", "size", "seed")},
        "recall": s.exclusive_recall,
        "shared_recall": s.shared_recall,
        "fp_shared": s.fp_shared,
        "fp_none": s.fp_none,
        "n_labelled": s.n_labelled,
        "fp_rate": s.fp_rate,
        "fve": (evaluation.fve_a + evaluation.fve_b) / 2,
        "dead_fraction": evaluation.dead_fraction,
        "seconds": time.perf_counter() - start,
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(runs: list[dict], sizes: list[int], archs: list[str]) -> dict:
    out: dict = {}
    for arch in archs:
        stats: dict[str, list[float]] = {}
        for metric in ("recall", "fp_rate", "shared_recall", "fve", "fp_shared", "fp_none", "n_labelled"):
            means, ses = [], []
            for size in sizes:
                m, se = mean_se([r[metric] for r in runs if r["arch"] == arch and r["size"] == size])
                means.append(m)
                ses.append(se)
            stats[f"{metric}_mean"], stats[f"{metric}_se"] = means, ses
        out[arch] = stats
    return out


def plot(results: dict, sizes: list[int], n_concepts: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arch, stats in results.items():
        for ax, metric, title in ((axes[0], "recall", "exclusive recall"), (axes[1], "fp_rate", "false-positive rate")):
            ax.errorbar(sizes, stats[f"{metric}_mean"], yerr=stats[f"{metric}_se"], marker="o", capsize=3, label=arch)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("dictionary size")
            ax.set_title(title)
            ax.axvline(n_concepts, color="grey", lw=0.8, ls=":")
    axes[0].legend()
    fig.suptitle(f"Toy model: {n_concepts} concepts (dotted line), mean ± s.e. over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="2048 concepts in d=256, 5 seeds, longer training")
    parser.add_argument("--n-concepts", type=int, default=512)
    parser.add_argument("--d", type=int, default=64, help="width of both models")
    parser.add_argument("--d-b", type=int, default=None, help="width of model B if different")
    parser.add_argument("--sizes", default=None, help="comma-separated dictionary sizes (default ¼× … 2× concepts)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--partition", type=float, default=0.05, help="DFC exclusive partition per model")
    parser.add_argument(
        "--dead-after-tokens", type=int, default=20_000, help="dead-feature window, scaled down for short runs"
    )
    parser.add_argument("--aux-k", type=int, default=5, help="dead features per token in AuxK (paper: d/2)")
    parser.add_argument("--aux-alpha", type=float, default=0.5, help="AuxK weight (paper: 1/32)")
    parser.add_argument(
        "--rank-decay", type=float, default=None, help="frequency decay per concept rank; default 0.001·2048/n_concepts"
    )
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--workers", type=int, default=2, help="parallel trainings (one thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS / "toy.json")
    args = parser.parse_args()
    if args.paper:
        args.n_concepts, args.d, args.seeds, args.steps, args.batch = 2048, 256, 5, 20_000, 2048
        args.dead_after_tokens = 1_000_000
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.n_concepts * f // 4 for f in (1, 2, 4, 8)]
    archs = args.archs.split(",")
    jobs = [
        {
            "arch": arch, "size": size, "seed": seed, "k": args.k, "partition": args.partition,
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "device": device, "threads": 1,
            "dead_after_tokens": args.dead_after_tokens, "aux_k": args.aux_k, "aux_alpha": args.aux_alpha,
            "world": asdict(
                ToyConfig(
                    n_concepts=args.n_concepts, d_a=args.d, d_b=args.d_b or args.d, seed=seed,
                    # Same frequency profile as the paper's 2048 concepts, whatever the number of concepts.
                    rank_decay=args.rank_decay if args.rank_decay is not None else 0.001 * 2048 / args.n_concepts,
                )
            ),
        }
        for seed in range(args.seeds)
        for size in sizes
        for arch in archs
    ]
    start = time.perf_counter()
    runs = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, run in enumerate(pool.imap_unordered(run_one, jobs), 1):
            runs.append(run)
            print(
                f"[{i}/{len(jobs)}] {run['arch']:>8} F={run['size']:<5} seed={run['seed']} "
                f"recall={run['recall']:.3f} fp={run['fp_rate']:.2f} fve={run['fve']:.3f} ({run['seconds']:.0f}s)",
                flush=True,
            )
    results = aggregate(runs, sizes, archs)
    print(f"\n{len(jobs)} trainings in {time.perf_counter() - start:.0f}s; mean ± s.e. over {args.seeds} seeds")
    print(f"{'arch':>8} {'F':>6} {'recall':>15} {'fp rate':>15} {'fp shared/none':>15} {'shared rec':>12} {'FVE':>7}")
    for arch in archs:
        s = results[arch]
        for i, size in enumerate(sizes):
            print(
                f"{arch:>8} {size:>6} {s['recall_mean'][i]:>8.3f}±{s['recall_se'][i]:.3f} "
                f"{s['fp_rate_mean'][i]:>8.3f}±{s['fp_rate_se'][i]:.3f} "
                f"{s['fp_shared_mean'][i]:>7.1f}/{s['fp_none_mean'][i]:<7.1f} "
                f"{s['shared_recall_mean'][i]:>12.3f} {s['fve_mean'][i]:>7.3f}"
            )
    payload = {
        "n_concepts": args.n_concepts,
        "dictionary_sizes": sizes,
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"device": device},
        "results": results,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    plot(results, sizes, args.n_concepts, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
