"""Benchmark residual-stream capture at layer L against a full forward pass with `output_hidden_states=True`.

Builds a random-init 8-layer Llama (d=256) locally, then times, on 2 CPU threads and in the same run:
the full forward (the baseline, base model without the LM head), capture with early stop on the full
model, and capture on a model loaded only up to layer L. The ideal speedup is n_layers / (L + 1); the
target is at least 0.8x of it. Each figure is the best of many interleaved repeats, since on a shared
machine noise only ever adds time; CPU-time speedups are reported as a cross-check. Prints a table and
writes ``benchmarks/results/extract_speed.json``.
Run: ``python benchmarks/extract_speed.py``.

``--replicas 1,2`` measures instead the real extract stage (budget and plan tasks, placement group, replica actors
loading the model, every block, the manifests) of two locally built models, once per replica count per model,
on a local Ray instance of ``--ray-cpus`` CPUs; it checks that every run stored the same bytes and records
``extraction_tokens_per_s`` (both models' tokens over the stage's wall time) by replica count in the same JSON,
keeping the capture figures. On 2 CPU cores this shows equality and bookkeeping, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dfc.lm.hooks import capture_activations  # noqa: E402
from tests.fixtures.tiny_models import build_tiny_model  # noqa: E402
from workers.activations.loading import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "extract_speed.json"
TARGET = 0.8
BASELINE = "full forward (hidden_states)"
ROW_FORMAT = "{:>2}  {:<30} {:>9.0f} {:>6.2f}x {:>6.2f}x {:>7.2f}x {:>7.2f} {:>6}"


@dataclass
class Row:
    """One (layer, method) measurement."""

    layer: int
    method: str
    tokens_per_s: float
    """Wall-clock throughput (best of the repeats)."""
    wall_speedup: float
    cpu_speedup: float
    """Speedup in CPU time consumed: a cross-check that other processes did not skew `wall_speedup`."""
    expected_speedup: float
    fraction_of_expected: float
    """`wall_speedup / expected_speedup`, judged against the target."""
    loaded_layers: int
    parameters: int


class Timing(NamedTuple):
    """Best wall and CPU seconds of one function over the repeats."""

    wall: float
    cpu: float


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, Timing]:
    """Best-of-`repeats` wall and process-CPU time per function, taking turns so load drift hits all alike.

    Minima, not medians: on a shared machine noise only ever adds time. CPU time counts the work done by
    this process's threads, which other processes competing for the cores barely change.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return {name: Timing(wall[name], cpu[name]) for name in fns}


def _stored_bytes(root: Path) -> dict[str, bytes]:
    base = root / "activations"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _write_results(update: dict[str, object]) -> None:
    """Merge ``update`` into the results JSON, so the capture figures and the replica figures keep each other."""
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({**previous, **update}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def measure_replicas(args: argparse.Namespace) -> None:
    """Time the extract stage with each replica count and record tokens/s by count (see the module docstring)."""
    import ray

    from workers.pipeline.run import run_audit
    from workers.pipeline.status import AuditStore
    from workers.spec import AuditSpec
    from workers.storage import LocalStore

    counts = [int(n) for n in args.replicas.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            arch: build_tiny_model(arch, Path(tmp) / arch, hidden_size=args.hidden_size, n_layers=args.n_layers)
            for arch in ("llama", "qwen3")
        }
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        runs: dict[str, dict[str, object]] = {}
        stored: dict[int, dict[str, bytes]] = {}
        try:
            for n in counts:
                resources = {"num_cpus": args.replica_cpus, "replicas": n}
                spec = AuditSpec.model_validate(
                    {
                        "model_a": {"id": str(models["llama"]), "resources": resources},
                        "model_b": {"id": str(models["qwen3"]), "resources": resources},
                        "corpus": {"kind": "builtin"},
                        "token_budget": args.budget,
                        "max_length": 256,
                    }
                )
                root = Path(tmp) / f"bucket-{n}"
                audit_id = AuditStore(LocalStore(root)).create(spec).id
                status = run_audit(audit_id, str(root), stop_after="extract")
                if status.error is not None:
                    raise SystemExit(f"extraction with {n} replicas failed: {status.error.message}")
                stage = LocalStore(root).get_json(f"audits/{audit_id}/stages/extract.json")
                tokens = stage["a"]["n_tokens"] + stage["b"]["n_tokens"]
                runs[str(n)] = {
                    "seconds": stage["seconds"],
                    "tokens": tokens,
                    "tokens_per_s": tokens / stage["seconds"],
                    "shards": {side: stage[side]["n_shards"] for side in ("a", "b")},
                    "blocks_per_replica": {side: stage[side]["blocks_per_replica"] for side in ("a", "b")},
                }
                stored[n] = _stored_bytes(root)
                rate, blocks = tokens / stage["seconds"], runs[str(n)]["blocks_per_replica"]
                print(f"{n} replica(s) per model: {tokens} tokens in {stage['seconds']:.1f} s = {rate:.0f} tokens/s; "
                      f"blocks per replica {blocks}")  # fmt: skip
        finally:
            ray.shutdown()
    same = all(files == stored[counts[0]] for files in stored.values())
    print(f"every run stored the same bytes ({len(stored[counts[0]])} objects): {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit("replica counts stored different bytes: that is a bug")
    _write_results(
        {
            "extraction_tokens_per_s": {n: run["tokens_per_s"] for n, run in runs.items()},
            "extraction_replicas": {
                "what": "the extract stage of two models (llama and qwen3, built locally), wall time of the whole "
                "stage (tasks, actor start, model load, every block, manifests), both models' tokens",
                "model": {"hidden_size": args.hidden_size, "n_layers": args.n_layers},
                "token_budget": args.budget,
                "ray_cpus": args.ray_cpus,
                "replica_cpus": args.replica_cpus,
                "cpu_count": os.cpu_count(),
                "load_average_1min": os.getloadavg()[0],
                "same_bytes": same,
                "runs": runs,
            },
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5], help="hooked layers L")
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--replicas", help="measure the extract stage with these replica counts instead, e.g. 1,2")
    parser.add_argument("--budget", type=int, default=100_000, help="--replicas: token budget of the audit")
    parser.add_argument("--ray-cpus", type=int, default=2, help="--replicas: CPUs of the local Ray instance")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="--replicas: CPUs each replica reserves")
    args = parser.parse_args()
    if args.replicas:
        measure_replicas(args)
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(
            "llama", Path(tmp) / "llama", hidden_size=args.hidden_size, n_layers=args.n_layers
        )
        full = load_model(path, device_map=None)
        truncated = {layer: load_model(path, device_map=None, up_to_layer=layer) for layer in args.layers}

    vocab = full.model.config.vocab_size
    ids = torch.randint(4, vocab, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    n_tokens = ids.numel()

    def baseline(layer: int) -> torch.Tensor:
        with torch.no_grad():
            out = full.model.base_model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            )
        return out.hidden_states[layer + 1]

    def n_params(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    rows: list[Row] = []
    for layer in args.layers:
        methods: dict[str, tuple[Callable[[], object], int, int]] = {
            BASELINE: (
                lambda layer=layer: baseline(layer),
                args.n_layers,
                n_params(full.model),
            ),
            "early stop": (
                lambda layer=layer: capture_activations(full.model, ids, mask, layer),
                args.n_layers,
                n_params(full.model),
            ),
            "truncated load + early stop": (
                lambda layer=layer: capture_activations(truncated[layer].model, ids, mask, layer),
                truncated[layer].n_loaded_layers,
                n_params(truncated[layer].model),
            ),
        }
        # The speedup is only meaningful if every method returns the same activations.
        reference = baseline(layer)
        for name, (fn, _, _) in list(methods.items())[1:]:
            got = fn().activations  # type: ignore[attr-defined]
            torch.testing.assert_close(got, reference, msg=f"{name} at layer {layer} differs from baseline")
        seconds = time_interleaved(
            {n: fn for n, (fn, _, _) in methods.items()}, warmup=1, repeats=args.repeats
        )
        base = seconds[BASELINE]
        for name, (_, loaded_layers, params) in methods.items():
            expected = 1.0 if name == BASELINE else args.n_layers / (layer + 1)
            wall_speedup = base.wall / seconds[name].wall
            rows.append(
                Row(
                    layer=layer,
                    method=name,
                    tokens_per_s=n_tokens / seconds[name].wall,
                    wall_speedup=wall_speedup,
                    cpu_speedup=base.cpu / seconds[name].cpu,
                    expected_speedup=expected,
                    fraction_of_expected=wall_speedup / expected,
                    loaded_layers=loaded_layers,
                    parameters=params,
                )
            )

    header = (
        f"{'L':>2}  {'method':<30} {'tokens/s':>9} {'wall x':>7} {'cpu x':>7} {'expected':>8} "
        f"{'of exp.':>7} {'layers':>6}"
    )
    print(
        f"capture speed: Llama d={args.hidden_size}, {args.n_layers} layers, batch {args.batch}x{args.seq} "
        f"tokens, {args.threads} CPU threads, fp32"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            ROW_FORMAT.format(
                r.layer,
                r.method,
                r.tokens_per_s,
                r.wall_speedup,
                r.cpu_speedup,
                r.expected_speedup,
                r.fraction_of_expected,
                r.loaded_layers,
            )
        )
    passed = all(r.fraction_of_expected >= TARGET for r in rows)
    print(f"target: every method's speedup >= {TARGET}x of n_layers/(L+1) -> {'PASS' if passed else 'FAIL'}")

    _write_results(
        {
            "benchmark": "extract_speed",
                "model": {"arch": "llama", "hidden_size": args.hidden_size, "n_layers": args.n_layers},
                "batch": {"rows": args.batch, "seq": args.seq, "tokens": n_tokens},
                "threads": args.threads,
                "dtype": "float32",
                "torch": torch.__version__,
                "machine": platform.machine(),
                "load_average_1min": os.getloadavg()[0],
                "target_fraction_of_expected": TARGET,
                "passed": passed,
                "rows": [asdict(r) for r in rows],
        }
    )


if __name__ == "__main__":
    main()
