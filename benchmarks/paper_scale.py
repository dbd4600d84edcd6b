"""The paper-scale plan: memory per GPU, stored bytes per token, and GPUs → hours of a paper-scale audit.

From shapes (F = 131,072, d = 4096 per model, k = 200, batch 2048, bf16 encoder pass; SCIENCE.md §4)
and from throughputs: the paper's (24 h of extraction on 3 H100s, 24 h of training on one) as the
reference point, scaled by data parallelism with the assumptions written next to the table; a GPU
measurement of ``benchmarks/train_speed.py --paper-scale`` when results/train_speed.json has one;
and, separately, what this machine measured (results/train_speed.json, results/extract_speed.json).
The memory model (``benchmarks/memory_model.py``) is checked against the measured peak of small
training steps on the CPU.

Prints tables and writes benchmarks/results/paper_scale.json. Run: python benchmarks/paper_scale.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.memory_model import FP32, check_training_peak, parameter_shapes, training_memory  # noqa: E402
from dfc.config import CrosscoderConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GPU_COUNTS = (1, 2, 4, 8, 16, 32)
GIB = 2**30


@dataclass(frozen=True)
class Audit:
    """A paper-scale audit (SCIENCE.md §4) and the cost its authors reported."""

    d_model: int = 4096
    """Residual width of each model (two 8B models)."""
    model_params: float = 8e9
    n_features: int = 131_072
    k: int = 200
    batch: int = 2048
    paired_tokens: int = 100_000_000
    steps: int = 100_000
    extraction_gpu_hours: float = 24 * 3
    """Paper: ~24 h on 3 H100s to collect both models' activations for 100M pairs."""
    training_gpu_hours: float = 24
    """Paper: ~24 h on one H100 per crosscoder (100k steps of batch 2048)."""

    @property
    def config(self) -> CrosscoderConfig:
        return CrosscoderConfig(d_a=self.d_model, d_b=self.d_model, n_features=self.n_features, k=self.k)

    @property
    def aux_k(self) -> int:
        """The trainer's default AuxK width, (d_A + d_B) / 4."""
        return (2 * self.d_model) // 4


@dataclass(frozen=True)
class Cluster:
    """What the hours table assumes about the GPUs and how they talk; none of it is measured here."""

    hbm_bytes_per_s: float = 2.7e12
    """Achieved HBM bandwidth of an H100 SXM (80% of 3.35 TB/s): the optimiser pass is memory-bound."""
    optimizer_passes: int = 10
    """Passes over the fp32 parameters per step and replica: fused Adam reads p, g, m, v and writes p, m, v;
    gradient clipping reads the gradients twice (norm, scale) and writes them once."""
    bus_bytes_per_s_node: float = 360e9
    """NCCL all-reduce bus bandwidth within one 8-GPU NVLink node."""
    bus_bytes_per_s_cluster: float = 180e9
    """NCCL all-reduce bus bandwidth across nodes (8×400 Gb/s InfiniBand per node)."""
    gpus_per_node: int = 8
    extraction_efficiency: float = 0.95
    """Data-parallel extraction: replicas work on disjoint documents; the rest is stragglers and start-up."""
    dense_flops_per_s: float = 989e12
    """H100 SXM dense bf16 peak, for the compute-bound extraction estimate."""
    mfu: float = 0.4
    """Fraction of that peak a forward pass reaches (compute-bound estimate only)."""
    layer_fraction: float = 0.5
    """The hooked layer's depth: extraction stops there (measured speed-up ≈ n_layers/(L+1), RESULTS.md)."""


# --------------------------------------------------------------------------- stored bytes per token
STORED_PER_TOKEN = {"token_ids": 4, "doc_ids": 8, "offsets": 8, "positions": 4, "special_mask": 1}
"""Bytes per token of each shard tensor besides the activations, in the dtypes extraction writes
(workers/activations/extract.py ``_document_part``; ``ShardData.normalised``)."""
PAIRS_PER_TOKEN = 16
"""The paired index (pairs.safetensors): one int64 row in A's shards and one in B's per pair."""


def shard_bytes_per_token(d_model: int) -> dict[str, int]:
    """Stored bytes of one token in one model's shards: bf16 activations plus per-token metadata."""
    return {"activations": 2 * d_model, **STORED_PER_TOKEN, "total": 2 * d_model + sum(STORED_PER_TOKEN.values())}


def bytes_per_paired_token(d_a: int, d_b: int, kept_fraction: float) -> float:
    """Stored bytes per paired token: both models' shards (each holds 1/kept_fraction tokens per pair) and the index."""
    per_model = shard_bytes_per_token(d_a)["total"] + shard_bytes_per_token(d_b)["total"]
    return per_model / kept_fraction + PAIRS_PER_TOKEN


# --------------------------------------------------------------------------- GPUs → hours
def allreduce_s(n_gpus: int, nbytes: float, cluster: Cluster) -> float:
    """Ring all-reduce time of ``nbytes``: each GPU sends and receives 2(n-1)/n of it at the bus bandwidth."""
    if n_gpus == 1:
        return 0.0
    bw = cluster.bus_bytes_per_s_node if n_gpus <= cluster.gpus_per_node else cluster.bus_bytes_per_s_cluster
    return 2 * (n_gpus - 1) / n_gpus * nbytes / bw


def training_step_s(
    n_gpus: int, one_gpu_step_s: float, param_bytes: float, cluster: Cluster, shard_optimizer: bool
) -> float:
    """Step time at a fixed global batch: the batch's work splits n ways, each replica's optimiser pass does not
    (unless sharded, ZeRO-1 style), and the gradients are all-reduced without overlap."""
    optimizer_s = cluster.optimizer_passes * param_bytes / cluster.hbm_bytes_per_s
    batch_s = max(one_gpu_step_s - optimizer_s, 0.0)
    per_replica_optimizer = optimizer_s / n_gpus if shard_optimizer else optimizer_s
    return batch_s / n_gpus + per_replica_optimizer + allreduce_s(n_gpus, param_bytes, cluster)


def hours_table(
    audit: Audit, cluster: Cluster, kept_fraction: float, measured_gpu_tokens_per_s: float | None
) -> list[dict[str, Any]]:
    """Hours of extraction and training of ``audit`` on 1…32 GPUs, with the memory per GPU of training."""
    config = audit.config
    param_bytes = sum(math.prod(s) for s in parameter_shapes(config).values()) * FP32
    paper_step_s = audit.training_gpu_hours * 3600 / audit.steps
    measured_step_s = audit.batch / measured_gpu_tokens_per_s if measured_gpu_tokens_per_s else None
    # Compute-bound extraction: forwards to the hooked layer of both models, over each model's tokens.
    flops_per_pair = 2 * 2 * audit.model_params * cluster.layer_fraction / kept_fraction
    compute_bound_gpu_h = audit.paired_tokens * flops_per_pair / (cluster.dense_flops_per_s * cluster.mfu) / 3600
    rows = []
    for n in GPU_COUNTS:
        extraction_speedup = n * (cluster.extraction_efficiency if n > 1 else 1.0)
        step = training_step_s(n, paper_step_s, param_bytes, cluster, shard_optimizer=False)
        sharded = training_step_s(n, paper_step_s, param_bytes, cluster, shard_optimizer=True)
        batch = math.ceil(audit.batch / n)
        memory = training_memory(config, batch, bf16=True, aux_k=audit.aux_k, n_dead=1)
        rows.append(
            {
                "gpus": n,
                "extraction_h": audit.extraction_gpu_hours / extraction_speedup,
                "training_h": audit.steps * step / 3600,
                "training_efficiency": paper_step_s / (n * step),
                "training_h_sharded_optimizer": audit.steps * sharded / 3600,
                "training_h_measured_gpu": (
                    audit.steps * training_step_s(n, measured_step_s, param_bytes, cluster, False) / 3600
                    if measured_step_s
                    else None
                ),
                "extraction_h_compute_bound": compute_bound_gpu_h / extraction_speedup,
                "batch_per_gpu": batch,
                "memory_per_gpu_bytes": memory.total,
                "memory_per_gpu_bytes_sharded_optimizer": memory.total - memory.adam_states + memory.adam_states // n,
            }
        )
    return rows


# --------------------------------------------------------------------------- what this machine measured
def _read(name: str) -> dict[str, Any]:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else {}


def measured_gpu_training(train_speed: dict[str, Any]) -> float | None:
    """Whole-run tokens/s of the DFC at paper scale on a GPU, if ``train_speed.py --paper-scale`` recorded one."""
    entry = train_speed.get("paper_scale", {})
    run = entry.get("dfc", {}).get("run")
    return float(run["tokens_per_s"]) if run and entry.get("meta", {}).get("device", "cpu") != "cpu" else None


def this_machine(
    audit: Audit, cluster: Cluster, train_speed: dict[str, Any], extract_speed: dict[str, Any], kept: float
) -> dict[str, Any]:
    """This CPU's measured throughputs, and (for scale only) the hours they would mean at paper shapes by FLOPs."""
    out: dict[str, Any] = {}
    configs = train_speed.get("configs", [])
    if configs:
        c = configs[0]
        run = c.get("run", {}).get("dfc", {})
        rate = run.get("tokens_per_s_mean", c["tokens_per_s"]["dfc"])
        flop_ratio = (2 * audit.d_model * audit.n_features) / ((c["d_a"] + c["d_b"]) * c["F"])
        out["training"] = {
            "shape": {k: c[k] for k in ("d_a", "d_b", "F", "k", "batch")},
            "tokens_per_s": rate,
            "measure": "whole-run mean" if run else "best round",
            "flop_ratio_to_paper_shape": flop_ratio,
            "paper_audit_hours_by_flops": audit.steps * audit.batch / (rate / flop_ratio) / 3600,
        }
    n_layers = extract_speed.get("model", {}).get("n_layers")
    rows = [r for r in extract_speed.get("rows", []) if r["method"] == "early stop"]
    if rows and n_layers:
        # The capture at the depth the plan assumes, on the full model: FLOPs scale with the parameter count.
        row = min(rows, key=lambda r: abs((r["layer"] + 1) / n_layers - cluster.layer_fraction))
        rate = row["tokens_per_s"]
        flop_ratio = audit.model_params / row["parameters"]
        out["extraction"] = {
            "model": extract_speed.get("model"),
            "method": row["method"],
            "layer": row["layer"],
            "tokens_per_s": rate,
            "flop_ratio_to_8b": flop_ratio,
            "paper_audit_hours_by_flops": 2 * audit.paired_tokens / kept / (rate / flop_ratio) / 3600,
        }
    return out


# --------------------------------------------------------------------------- the check of the memory model
CHECK_SHAPES: tuple[tuple[tuple[int, int, int, int, int], dict[str, Any]], ...] = (
    ((256, 256, 8192, 32, 1024), {}),
    ((256, 256, 8192, 32, 1024), {"dead_after_tokens": 10**12}),
    ((512, 512, 16384, 64, 1024), {}),
    ((256, 384, 32768, 32, 2048), {}),
    ((256, 384, 32768, 32, 2048), {"bf16": True}),
)
"""Weights-dominated and activation-dominated shapes, with and without AuxK, fp32 and bf16 encoder pass."""


def memory_check() -> list[dict[str, Any]]:
    rows = []
    for shape, options in CHECK_SHAPES:
        check = check_training_peak(*shape, **options)
        rows.append(
            check.shape
            | {
                "auxk": check.n_dead > 0,
                "n_dead": check.n_dead,
                "measured_bytes": check.measured,
                "predicted_bytes": check.predicted.total,
                "ratio_predicted_over_measured": check.ratio,
                "predicted_components": check.predicted.components(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-check", action="store_true", help="do not measure the CPU peaks (plan only)")
    parser.add_argument("--out", type=Path, default=RESULTS / "paper_scale.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    audit, cluster = Audit(), Cluster()
    train_speed, extract_speed = _read("train_speed.json"), _read("extract_speed.json")
    kept = float(_read("align.json").get("kept_token_fraction", 1.0))
    memory = training_memory(audit.config, audit.batch, bf16=True, aux_k=audit.aux_k, n_dead=1)
    per_pair = bytes_per_paired_token(audit.d_model, audit.d_model, kept)
    gpu_rate = measured_gpu_training(train_speed)
    hours = hours_table(audit, cluster, kept, gpu_rate)

    print(f"memory per GPU, one training replica: F={audit.n_features} d={audit.d_model}+{audit.d_model} "
          f"k={audit.k} batch {audit.batch}, bf16 encoder pass (fp32 weights and Adam)")
    for name, value in memory.components().items():
        print(f"  {name:<12} {value / GIB:8.2f} GiB")
    print("  peak phase:  " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in memory.phases.items()) + " GiB")
    shard = shard_bytes_per_token(audit.d_model)
    print(f"\nstored bytes per token per model: {shard}; kept fraction after alignment {kept:.3f}")
    total_tb = per_pair * audit.paired_tokens / 1e12
    print(f"per paired token {per_pair:,.0f} B; {audit.paired_tokens:,} pairs: {total_tb:.2f} TB")
    print("\nGPUs → hours (paper reference scaled; see assumptions)")
    header = ["GPUs", "extract h", "train h", "train eff", "ZeRO-1 h", "GPU-meas h", "extract floor h", "GiB/GPU"]
    print(" ".join(f"{h:>15}" for h in header))
    for r in hours:
        measured = f"{r['training_h_measured_gpu']:.2f}" if r["training_h_measured_gpu"] else "—"
        cells = [r["gpus"], f"{r['extraction_h']:.1f}", f"{r['training_h']:.2f}", f"{r['training_efficiency']:.2f}",
                 f"{r['training_h_sharded_optimizer']:.2f}", measured, f"{r['extraction_h_compute_bound']:.2f}",
                 f"{r['memory_per_gpu_bytes'] / GIB:.1f}"]
        print(" ".join(f"{c:>15}" for c in cells))
    machine = this_machine(audit, cluster, train_speed, extract_speed, kept)
    for stage, entry in machine.items():
        print(f"\nthis machine, {stage}: {entry['tokens_per_s']:,.0f} tokens/s "
              f"({entry.get('measure', entry.get('method'))}); at paper shapes by FLOPs: "
              f"{entry['paper_audit_hours_by_flops']:,.0f} h")
    check = [] if args.skip_check else memory_check()
    if check:
        print("\nmemory model vs measured peak of a CPU training step (tensor bytes, torch profiler)")
        print(f"{'d_a':>5} {'d_b':>5} {'F':>6} {'k':>4} {'batch':>6} {'bf16':>5} {'AuxK':>5} "
              f"{'measured MB':>12} {'predicted MB':>13} {'ratio':>6}")
        for r in check:
            print(f"{r['d_a']:>5} {r['d_b']:>5} {r['F']:>6} {r['k']:>4} {r['batch']:>6} {r['bf16']!s:>5} "
                  f"{r['auxk']!s:>5} {r['measured_bytes'] / 1e6:>12.1f} {r['predicted_bytes'] / 1e6:>13.1f} "
                  f"{r['ratio_predicted_over_measured']:>6.3f}")
    assumptions = {
        "extraction": (
            f"paper: {audit.extraction_gpu_hours:.0f} H100-hours for {audit.paired_tokens:,} pairs of two 8B models "
            f"(24 h on 3 H100s, SCIENCE.md §4) = {audit.paired_tokens / (audit.extraction_gpu_hours * 3600):.0f} "
            f"pairs/s per GPU; replicas on disjoint documents at efficiency {cluster.extraction_efficiency}"
        ),
        "extraction_compute_bound": (
            f"forwards of both models to layer {cluster.layer_fraction:.0%} of depth over each model's tokens "
            f"(pairs / kept fraction {kept:.2f}), {cluster.dense_flops_per_s / 1e12:.0f} TFLOP/s bf16 at MFU "
            f"{cluster.mfu}: a floor, not a plan"
        ),
        "training": (
            f"paper: {audit.training_gpu_hours:.0f} h on one H100 for {audit.steps:,} steps of {audit.batch} "
            f"({audit.training_gpu_hours * 3600 / audit.steps:.3f} s/step); data parallel at the same global batch: "
            "the batch's work splits n ways, each replica's optimiser pass does not, fp32 gradients all-reduced "
            "without overlap"
        ),
        "training_measured_gpu": (
            "benchmarks/train_speed.py --paper-scale whole-run mean, same scaling" if gpu_rate else "no GPU measured"
        ),
        "cluster": {k: v for k, v in vars(cluster).items()},
        "memory": (
            "one replica at the per-GPU batch: fp32 weights, 2 fp32 Adam moments, fp32 gradients (kept from one "
            "step to the next), buffers, the input batch and the largest phase of temporaries; AuxK active; "
            "ZeRO-1 column divides the Adam moments by n (not implemented in dfc/trainer.py)"
        ),
        "kept_token_fraction": f"{kept:.3f}, results/align.json (production tokenizers, offsets mode)",
    }
    table = {
        "memory_per_gpu_bytes": memory.components(),
        "memory_phases_bytes": memory.phases,
        "bytes_per_token": {
            "per_model": shard,
            "per_paired_token": per_pair,
            "paired_tokens": audit.paired_tokens,
            "total_bytes": per_pair * audit.paired_tokens,
        },
        "hours": hours,
        "assumptions": assumptions,
    }
    meta = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
            "load_average_1min": os.getloadavg()[0]}
    out = {"meta": meta, "paper_scale": table, "this_machine": machine, "memory_check": check}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
