"""Extraction and data-path benchmark: layer capture vs a full forward, and shards on S3 vs the trainer.

1. Runs benchmarks/extract_speed.py (capture at layer L of an 8-layer model vs a full forward with
   output_hidden_states=True, same run) and takes its numbers.
2. Starts a real S3-compatible server (SeaweedFS) on loopback, writes activation shards of two
   models, aligns them, and measures: shard write throughput, the paired reader's throughput
   (checksums verified, shuffled, prefetched), the trainer's step throughput on in-memory batches,
   and the trainer fed by the reader — the reader must not starve the trainer.

Writes benchmarks/results/extract.json.   Run: python benchmarks/extract.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `tests` importable

import torch

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.trainer import TrainConfig, Trainer
from tests.fixtures.s3 import running_s3_server
from workers.activations.pairing import PairedActivations, align_activations
from workers.activations.shards import ShardData, ShardWriter

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def write_model(store, prefix: str, n_docs: int, doc_len: int, d: int, per_shard: int) -> float:
    """Write ``n_docs`` documents of ``doc_len`` one-character-word tokens; returns tokens/s."""
    g = torch.Generator().manual_seed(d)
    writer = ShardWriter(store, prefix, tokens_per_shard=per_shard)
    offsets = torch.stack([torch.arange(doc_len) * 2, torch.arange(doc_len) * 2 + 1], dim=1).int()
    start = time.perf_counter()
    for doc in range(n_docs):
        acts = torch.randn(doc_len, d, generator=g)
        writer.add(ShardData(acts, torch.arange(doc_len), torch.full((doc_len,), doc), offsets, torch.arange(doc_len)))
    writer.finish({"benchmark": True})
    return n_docs * doc_len / (time.perf_counter() - start)


def trainer_for(d_a: int, d_b: int, threads: int) -> Trainer:
    torch.set_num_threads(threads)
    model = Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, n_features=8192, k=32))
    return Trainer(model, TrainConfig(steps=10**6, k_anneal_steps=0, log_every=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--n-docs", type=int, default=1024)
    parser.add_argument("--doc-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-capture", action="store_true", help="reuse results/extract_speed.json")
    args = parser.parse_args()

    if not args.skip_capture:
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "extract_speed.py"), "--layers", str(args.layer)],
            check=True,
            cwd=ROOT,
        )
    capture = json.loads((RESULTS / "extract_speed.json").read_text())
    rows = [r for r in capture["rows"] if r["layer"] == args.layer]
    full = next(r for r in rows if r["method"].startswith("full"))
    best = max(rows, key=lambda r: r["tokens_per_s"])
    n_layers = capture["model"]["n_layers"]

    d_a, d_b, batch = 256, 384, 1024
    with tempfile.TemporaryDirectory() as tmp, running_s3_server(Path(tmp)) as server:
        store = server.store("bench")
        write_a = write_model(store, "act/a", args.n_docs, args.doc_len, d_a, 65536)
        write_b = write_model(store, "act/b", args.n_docs, args.doc_len, d_b, 65536)
        text = " ".join("x" * args.doc_len)
        aligned = align_activations(store, "act/a", "act/b", lambda _: text, "alignment")
        reader = PairedActivations(store, "act/a", "act/b", aligned.pairs_key, batch_size=batch, shuffle_buffer=65536)
        n_batches = reader.batches_per_epoch()
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        consumed = sum(1 for _ in islice(reader, n_batches))
        reader_tps = consumed * batch / (time.perf_counter() - start)

        trainer = trainer_for(d_a, d_b, args.threads)
        fixed = next(iter(reader))
        trainer.step(*fixed)
        steps = 40
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step(*fixed)
        trainer_tps = steps * batch / (time.perf_counter() - start)

        fed = trainer_for(d_a, d_b, args.threads)
        stream = iter(reader)
        fed.step(*next(stream))
        start = time.perf_counter()
        for x_a, x_b in islice(stream, steps):
            fed.step(x_a, x_b)
        fed_tps = steps * batch / (time.perf_counter() - start)

    result = {
        "n_layers": n_layers,
        "layer": args.layer,
        "speedup_vs_full_forward": best["tokens_per_s"] / full["tokens_per_s"],
        "expected_speedup": n_layers / (args.layer + 1),
        "capture_tokens_per_s": best["tokens_per_s"],
        "full_forward_tokens_per_s": full["tokens_per_s"],
        "shard_write_tokens_per_s": {"a": write_a, "b": write_b},
        "reader_tokens_per_s": reader_tps,
        "trainer_tokens_per_s": trainer_tps,
        "trainer_fed_by_reader_tokens_per_s": fed_tps,
        "starvation_ratio": fed_tps / trainer_tps,
        "tokens_per_model": args.n_docs * args.doc_len,
        "widths": [d_a, d_b],
        "threads": args.threads,
    }
    print(f"capture at layer {args.layer}/{n_layers}: {result['speedup_vs_full_forward']:.2f}x "
          f"(expected {result['expected_speedup']:.2f}x)")
    print(f"{'stage':<34} {'tokens/s':>12}")
    for name, value in (
        ("shard write A (S3)", write_a), ("shard write B (S3)", write_b), ("paired reader (S3, verified)", reader_tps),
        ("trainer step, in-memory batch", trainer_tps), ("trainer fed by the reader", fed_tps),
    ):
        print(f"{name:<34} {value:>12.0f}")
    print(f"reader/trainer = {reader_tps / trainer_tps:.1f}x; trainer fed by reader runs at "
          f"{100 * result['starvation_ratio']:.0f}% of its in-memory speed")
    out = RESULTS / "extract.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
