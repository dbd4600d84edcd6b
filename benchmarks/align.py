"""Benchmark token alignment on the mixed corpus under pairs of real production tokenizers.

Tokenises ``benchmarks/data/mixed_corpus.jsonl`` once per tokenizer (ids + offsets, as the pipeline stores
them), then times both alignment modes on those stored arrays on one thread. Throughput counts the tokens of
both sides, special tokens included, per second of alignment (special-token masks included; vocabulary
tables built beforehand). Every pair made on a document both tokenizers decode losslessly is checked: the
decoded text since the previous pair must be equal under normalisation on both sides ("bad pairs").
Prints a table and the first mismatch of every failure, and writes ``benchmarks/results/align.json``.
Run: ``python benchmarks/align.py`` (under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dfc.lm.align import (  # noqa: E402
    DEFAULT_MODE,
    AlignmentSummary,
    AlignMode,
    AlignStatus,
    SequenceAlignment,
    align_ids,
    align_offsets,
    normalise,
    special_ids,
    token_table,
)
from tests.fixtures.prod_tokenizers import BUILDERS  # noqa: E402

CORPUS = ROOT / "benchmarks" / "data" / "mixed_corpus.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "align.json"


@dataclass
class Stored:
    """One tokenizer's stored view of the corpus, as the pipeline keeps it."""

    tokenizer: PreTrainedTokenizerFast
    ids: list[list[int]]
    offsets: list[list[tuple[int, int]]]
    lossless: list[bool]
    """Whether decoding the ids gives back the document under normalisation."""

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def store(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> tuple[Stored, float]:
    """Tokenise as the model sees the text (BOS included where it adds one); also return the seconds taken."""
    start = time.perf_counter()
    enc = tokenizer(texts, return_offsets_mapping=True)
    seconds = time.perf_counter() - start
    ids = enc["input_ids"]
    lossless = [
        normalise(tokenizer.decode(i, skip_special_tokens=True)) == normalise(t)
        for i, t in zip(ids, texts, strict=True)
    ]
    return Stored(tokenizer, ids, [list(map(tuple, o)) for o in enc["offset_mapping"]], lossless), seconds


def align_all(mode: AlignMode, texts: list[str], a: Stored, b: Stored) -> list[SequenceAlignment]:
    """Align every sequence in one mode from the stored arrays."""
    if mode is AlignMode.IDS:
        return [align_ids(x, y, a.tokenizer, b.tokenizer) for x, y in zip(a.ids, b.ids, strict=True)]
    specials_a, specials_b = special_ids(a.tokenizer), special_ids(b.tokenizer)
    return [
        align_offsets(
            t, oa, ob, special_a=[i in specials_a for i in ia], special_b=[i in specials_b for i in ib]
        )
        for t, oa, ob, ia, ib in zip(texts, a.offsets, b.offsets, a.ids, b.ids, strict=True)
    ]


def bad_pairs(result: SequenceAlignment, a: Stored, b: Stored, k: int) -> int:
    """Pairs of sequence ``k`` whose decoded text since the previous pair differs under normalisation."""
    bad, prev_a, prev_b = 0, 0, 0
    for p, q in zip(result.positions_a.tolist(), result.positions_b.tolist(), strict=True):
        left = normalise(a.tokenizer.decode(a.ids[k][prev_a : p + 1], skip_special_tokens=True))
        right = normalise(b.tokenizer.decode(b.ids[k][prev_b : q + 1], skip_special_tokens=True))
        bad += left != right
        prev_a, prev_b = p + 1, q + 1
    return bad


def bench_pair(
    mode: AlignMode, texts: list[str], a: Stored, b: Stored, repeats: int
) -> tuple[list[SequenceAlignment], float, dict[str, Any]]:
    """Alignments, best-of-``repeats`` seconds, and the per-pair report of one mode."""
    token_table(a.tokenizer), token_table(b.tokenizer)  # built once per vocabulary, outside the timing
    seconds, result = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = align_all(mode, texts, a, b)
        seconds = min(seconds, time.perf_counter() - start)
    summary = AlignmentSummary.of(result)
    checked = [k for k in range(len(texts)) if a.lossless[k] and b.lossless[k]]
    report = {
        "aligned_sequence_fraction": summary.aligned_sequence_fraction,
        "kept_token_fraction": summary.kept_token_fraction,
        "tokens_per_s_per_core": (a.n_tokens + b.n_tokens) / seconds,
        "checked_sequences": len(checked),
        "checked_pairs": sum(result[k].n_pairs for k in checked),
        "bad_pairs": sum(bad_pairs(result[k], a, b, k) for k in checked),
        "failures": [
            {"sequence": k, "first_mismatch": r.first_mismatch}
            for k, r in enumerate(result)
            if r.status is AlignStatus.TRUNCATED
        ],
    }
    return result, seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core for tokenisation as well
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]
    stored, tokenise_s = {}, {}
    for name in args.tokenizers:
        stored[name], tokenise_s[name] = store(BUILDERS[name](), texts)

    header = (
        f"{'pair':<24} {'mode':<8} {'seqs':>5} {'aligned':>8} {'kept':>7} {'tok/s/core':>11}  bad/checked"
    )
    print(header + "\n" + "-" * len(header))
    pairs, failures = [], []
    totals: dict[AlignMode, list[SequenceAlignment]] = {m: [] for m in AlignMode}
    work = {m: [0, 0.0] for m in AlignMode}  # tokens, seconds
    for name_a, name_b in combinations(args.tokenizers, 2):
        a, b = stored[name_a], stored[name_b]
        detail: dict[str, Any] = {"pair": [name_a, name_b], "tokens": [a.n_tokens, b.n_tokens], "modes": {}}
        for mode in AlignMode:
            result, seconds, report = bench_pair(mode, texts, a, b, args.repeats)
            totals[mode] += result
            work[mode][0] += a.n_tokens + b.n_tokens
            work[mode][1] += seconds
            detail["modes"][mode.value] = report
            print(
                f"{name_a + ' vs ' + name_b:<24} {mode.value:<8} {len(texts):>5} "
                f"{report['aligned_sequence_fraction']:>8.2%} {report['kept_token_fraction']:>7.2%} "
                f"{report['tokens_per_s_per_core']:>11,.0f}  {report['bad_pairs']}/{report['checked_pairs']}"
            )
            failures += [
                f"  [{name_a}/{name_b} {mode} #{f['sequence']}] {f['first_mismatch']}"
                for f in report["failures"]
            ]
        pairs.append(detail)
    print("\nfirst mismatch of each failure:\n" + "\n".join(failures) if failures else "\nno failures")

    def overall(mode: AlignMode) -> dict[str, float]:
        summary = AlignmentSummary.of(totals[mode])
        return {
            "aligned_sequence_fraction": summary.aligned_sequence_fraction,
            "kept_token_fraction": summary.kept_token_fraction,
            "tokens_per_s_per_core": work[mode][0] / work[mode][1],
        }

    results = {
        "tokenizers": args.tokenizers,
        "sequences": len(texts),
        "mode": DEFAULT_MODE.value,
        **overall(DEFAULT_MODE),
        "throughput_counts": "tokens of both sides (specials included) per second of alignment from stored "
        "ids/offsets on one thread, best of repeats; ids mode stops early on truncated sequences",
        "by_mode": {m.value: overall(m) for m in AlignMode},
        "tokenisation_s": tokenise_s,
        "pairs": pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
