"""Training tokens/s of the pipeline's real training path with 1 and 2 data-parallel workers, same global batch.

Each run is what the train stage runs: ``TrainingActor``s on a local Ray (one CPU each, so one thread each), the
paired reader streaming stored shards (each worker its rows of every batch), k annealing, AuxK on dead features,
dead-feature bookkeeping and checkpoints uploaded to the store; rank 0 also evaluates and stores the final
weights. Tokens/s is the mean over the whole run: the tokens trained on over the run's training time
(``TrainingOutcome.wall_time_s``). A third row, one worker on two threads, is the fair comparison on a two-core
machine: the same cores, split by threads instead of by processes.

Data: synthetic shards (a sparse latent seen through a different random map by each "model"), written once.
Prints a table and writes benchmarks/results/scale_training.json (``training_tokens_per_s`` keyed by workers).
Run: python benchmarks/scale_training.py [--steps 60] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from safetensors.torch import save as save_safetensors  # noqa: E402

from dfc.config import CrosscoderConfig  # noqa: E402
from dfc.trainer import TrainConfig  # noqa: E402
from workers.activations.shards import ShardData, ShardWriter  # noqa: E402
from workers.pipeline import actors  # noqa: E402
from workers.pipeline.training import TrainingJob, split_pairs  # noqa: E402
from workers.storage import LocalStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class Shape(NamedTuple):
    """The benchmarked crosscoder: train_speed.py's second shape (two widths, as two real models have)."""

    d_a: int = 256
    d_b: int = 384
    n_features: int = 8192
    k: int = 32
    batch: int = 1024


def write_activations(store: LocalStore, shape: Shape, n_tokens: int, doc_len: int = 256) -> tuple[str, str, str]:
    """Both models' shards and the paired index (token i of A ↔ token i of B); returns the two prefixes and the
    index key."""
    g = torch.Generator().manual_seed(0)
    concepts = 1024
    maps = {"a": torch.randn(concepts, shape.d_a, generator=g), "b": torch.randn(concepts, shape.d_b, generator=g)}
    latent = (torch.rand(n_tokens, concepts, generator=g) < 0.02).float() * torch.rand(n_tokens, concepts, generator=g)
    for side, weights in maps.items():
        writer = ShardWriter(store, f"act/{side}", tokens_per_shard=8192)
        acts = latent @ weights + 0.1 * torch.randn(n_tokens, weights.shape[1], generator=g)
        for doc, start in enumerate(range(0, n_tokens, doc_len)):
            n = min(doc_len, n_tokens - start)
            offsets = torch.stack([torch.arange(n), torch.arange(n) + 1], dim=1).int()
            writer.add(ShardData(acts[start : start + n], torch.zeros(n, dtype=torch.long),
                                 torch.full((n,), doc, dtype=torch.long), offsets, torch.arange(n)))  # fmt: skip
        writer.finish({"model": side})
    index = torch.arange(n_tokens)
    store.put_bytes("audit/alignment/pairs.safetensors", save_safetensors({"a": index, "b": index.clone()}))
    return "act/a", "act/b", "audit/alignment/pairs.safetensors"


def run_once(
    store_url: str, job: TrainingJob, workers: int, threads_per_worker: int
) -> tuple[dict[str, Any], float]:
    """One training run on ``workers`` fresh actors; returns rank 0's outcome and the call's wall time."""
    handles = [
        actors.TrainingActor.options(num_cpus=threads_per_worker, **actors.gang_options(workers)).remote(
            store_url, {}, threads_per_worker
        )
        for _ in range(workers)
    ]
    try:
        ray.get([h.progress.remote() for h in handles])  # started, so actor start-up is not timed
        start = time.perf_counter()
        if workers == 1:
            outcome = ray.get(handles[0].run.remote(job))
        else:
            address = ray.get(handles[0].rendezvous.remote())
            outcome = ray.get([h.run.remote(job, rank, workers, address) for rank, h in enumerate(handles)])[0]
        return outcome, time.perf_counter() - start
    finally:
        actors.stop({str(i): h for i, h in enumerate(handles)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="steps of each run")
    parser.add_argument("--runs", type=int, default=2, help="interleaved runs of each configuration")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="checkpoint interval")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_training.json")
    args = parser.parse_args()
    shape = Shape()
    folder = Path(tempfile.mkdtemp(prefix="dfc-scale-training-"))
    store = LocalStore(folder / "bucket")
    prefix_a, prefix_b, pairs_key = write_activations(store, shape, n_tokens=max(80_000, shape.batch * 80))
    split = split_pairs(store, pairs_key, "audit/alignment", min_train=shape.batch)
    model = CrosscoderConfig(d_a=shape.d_a, d_b=shape.d_b, n_features=shape.n_features, k=shape.k)
    recipe = TrainConfig(steps=args.steps, lr=1e-3, checkpoint_every=args.checkpoint_every,
                         dead_after_tokens=2 * shape.batch, log_every=0)  # fmt: skip
    configs = {"1": (1, 1), "2": (2, 1), "1_two_threads": (1, 2)}  # name: (workers, threads per worker)
    actors.ensure_ray(num_cpus=2)
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for round_ in range(args.runs):
        for name, (workers, threads) in configs.items():  # interleaved, so a busy spell hits every configuration
            job = TrainingJob(
                prefix_a=prefix_a, prefix_b=prefix_b, train_key=split.train_key, n_train=split.n_train,
                heldout_key=split.heldout_key, n_heldout=split.n_heldout,
                out_prefix=f"audit/crosscoder/{name}-{round_}", model=model, train=recipe, batch_size=shape.batch,
                seed=0, scratch_dir=str(folder / "scratch" / f"{name}-{round_}"), eval_batches=4,
            )  # fmt: skip
            outcome, call_s = run_once(str(folder / "bucket"), job, workers, threads)
            measured[name].append(
                {
                    "tokens_per_s": outcome["tokens"] / outcome["wall_time_s"],
                    "tokens": outcome["tokens"],
                    "training_s": outcome["wall_time_s"],
                    "call_s": round(call_s, 3),
                    "final_loss": outcome["loss_curve"][-1]["loss"],
                    "final_dead_fraction": outcome["final_dead_fraction"],
                }
            )
    ray.shutdown()
    mean = {name: sum(r["tokens_per_s"] for r in rows) / len(rows) for name, rows in measured.items()}
    print(f"shape {shape._asdict()}, {args.steps} steps, checkpoint every {args.checkpoint_every}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'configuration':>28} {'tokens/s (mean of runs)':>24} {'runs':>28} {'final loss':>11}")
    labels = {"1": "1 worker, 1 thread", "2": "2 workers, 1 thread each", "1_two_threads": "1 worker, 2 threads"}
    for name, rows in measured.items():
        runs = " ".join(f"{r['tokens_per_s']:.0f}" for r in rows)
        print(f"{labels[name]:>28} {mean[name]:>24.0f} {runs:>28} {rows[-1]['final_loss']:>11.4f}")
    result = {
        "meta": {
            "device": "cpu",
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "machine": platform.machine(),
            "load_average_1min": os.getloadavg()[0],
            "shape": shape._asdict(),
            "steps": args.steps,
            "checkpoint_every": args.checkpoint_every,
            "what": "mean over a whole run of the pipeline's training path (TrainingActor, stored shards, k "
            "annealing, AuxK, dead-feature bookkeeping, checkpoints); same global batch for every configuration",
        },
        "training_tokens_per_s": {"1": mean["1"], "2": mean["2"]},
        "one_worker_two_threads_tokens_per_s": mean["1_two_threads"],
        "runs": measured,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
