"""Benchmark the cross-tokenizer text scorer: what it costs and what the old depth-first search lost.

On the planted pair (built once, cached like the demo's), every trigger and neutral prompt is a context; the
audited model B's three likeliest next tokens after it are the continuation texts, scored under the reference
model A in A's tokenizer — the divergence's question. Then the same on the three production tokenizers (Qwen BPE,
Mistral SentencePiece, Tekken) with random peaked one-block models of their vocabularies, over fixed contexts
and multi-token words (cost and losses only: no trained model). Two scorers:

- ``depth-first`` — the scorer before this change, kept here as the baseline: healed prefix search, most
  probable first token first, depth first, 12 prefixes per search, one forward per prefix.
- ``canonical-first`` — ``dfc.lm.scoring``: canonical tokens first, then best-first by path probability, batched.

Reported per continuation: forward passes, prefixes computed, seconds; how often the score fell below the
probability of A's own canonical tokens ("lost canonical") and by how much; and seconds per screened feature
(10 contexts × 3 continuations, both models, as the steer stage screens one). Writes
``benchmarks/results/scoring.json``. Run: ``python benchmarks/scoring.py`` (about a minute with the pair built).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dfc.lm.scoring import LOGPROB_FLOOR, Forwards, TokenTexts, score_text, token_texts  # noqa: E402
from tests.dfc.lm.test_scoring import CONTEXTS, WORDS, random_lm  # noqa: E402
from tests.fixtures.prod_tokenizers import BUILDERS  # noqa: E402
from workers.planted.pair import build_planted_pair  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scoring.json"
OLD_BUDGET = 12
OLD_PRUNE = 1e-9


class OldForwards:
    """The old scorer's cache: one unbatched forward per prefix."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.cache, self.calls = model, {}, 0

    def __call__(self, ids: list[int]) -> torch.Tensor:
        key = tuple(ids)
        if key not in self.cache:
            logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            self.cache[key] = torch.softmax(logits, -1)
            self.calls += 1
        return self.cache[key]


def old_prefix(forward: OldForwards, ids: list[int], text: str, vocab: TokenTexts, budget: list[int]) -> float:
    budget[0] -= 1
    p = forward(ids)
    covering = vocab.starting_with(text)
    total = float(p[covering].sum()) if covering else 0.0
    for token, rest in sorted(vocab.strict_prefixes(text), key=lambda tr: -float(p[tr[0]])):
        weight = float(p[token])
        if weight < OLD_PRUNE or budget[0] <= 0:
            continue
        total += weight * old_prefix(forward, [*ids, token], rest, vocab, budget)
    return total


@torch.no_grad()
def old_logprob(model: Any, tok: Any, context: str, text: str, forward: OldForwards) -> float:
    vocab = token_texts(tok)
    ids = tok(context)["input_ids"]
    last = vocab.texts[ids[-1]] if ids else ""
    if not last or len(ids) < 2:
        joint, prior = old_prefix(forward, ids, text, vocab, [OLD_BUDGET]), 1.0
    else:
        prior = old_prefix(forward, ids[:-1], last, vocab, [OLD_BUDGET])
        joint = old_prefix(forward, ids[:-1], last + text, vocab, [OLD_BUDGET])
    if joint <= 0 or prior <= 0:
        return LOGPROB_FLOOR
    return max(min(math.log(joint / prior), 0.0), LOGPROB_FLOOR)


@torch.no_grad()
def canonical_logprob(model: Any, tok: Any, context: str, text: str) -> float | None:
    ids, full = tok(context)["input_ids"], tok(context + text)["input_ids"]
    if full[: len(ids)] != ids or len(full) == len(ids):
        return None
    logits = model(input_ids=torch.tensor([full]), use_cache=False).logits[0].float().log_softmax(-1)
    return max(sum(float(logits[i - 1, full[i]]) for i in range(len(ids), len(full))), LOGPROB_FLOOR)


@torch.no_grad()
def continuations(model: Any, tok: Any, prompts: list[str], k: int = 3) -> list[tuple[str, str]]:
    vocab = token_texts(tok)
    out = []
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        probs = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].softmax(-1)
        for token in probs.topk(k).indices.tolist():
            if vocab.texts[token]:
                out.append((prompt, vocab.texts[token]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("DFC_CACHE") or "~/.cache/dfc-audit"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = build_planted_pair(args.cache.expanduser() / "planted")
    a = AutoModelForCausalLM.from_pretrained(pair.model_a_dir).eval()
    a_tok = AutoTokenizer.from_pretrained(pair.model_a_dir)
    b = AutoModelForCausalLM.from_pretrained(pair.model_b_dir).eval()
    b_tok = AutoTokenizer.from_pretrained(pair.model_b_dir)
    cases = continuations(b, b_tok, pair.trigger_prompts + pair.neutral_prompts)
    results = {"planted (B's tokens under A)": measure(a, a_tok, cases)}
    for name, build in BUILDERS.items():
        tok = build()
        model = random_lm(len(tok), seed=0)
        results[f"{name} (random model)"] = measure(model, tok, [(c, w) for c in CONTEXTS for w in WORDS])
    print(f"{'case':30} {'scorer':16} {'n':>4} {'fwd/cont':>9} {'prefixes':>9} {'ms/cont':>8} {'ratio':>6} "
          f"{'lost':>5} {'max lost':>9} {'s/feature':>9}")  # fmt: skip
    for case, rows in results.items():
        base = rows["depth-first"]["ms_per_continuation"]
        for name, row in rows.items():
            print(f"{case:30} {name:16} {row['continuations']:4d} {row['forwards_per_continuation']:9.1f} "
                  f"{row['prefixes_per_continuation']:9.1f} {row['ms_per_continuation']:8.1f} "
                  f"{row['ms_per_continuation'] / base:6.2f} {row['lost_canonical']:5d} {row['max_nats_lost']:9.2f} "
                  f"{row['s_per_screened_feature']:9.2f}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cases": results}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


def measure(a: Any, a_tok: Any, cases: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Both scorers on ``(context, text)`` cases under model ``a``."""
    rows: dict[str, dict[str, Any]] = {}
    for name in ("depth-first", "canonical-first"):
        forwards_per, rows_per, seconds, losses = [], [], [], []
        for context, text in cases:
            start = time.perf_counter()
            if name == "depth-first":
                forward = OldForwards(a)
                got = old_logprob(a, a_tok, context, text, forward)
                calls, computed = forward.calls, forward.calls
            else:
                batched = Forwards(a)
                got = score_text(a, a_tok, context, text, forwards=batched).logprob
                calls, computed = batched.calls, batched.rows
            seconds.append(time.perf_counter() - start)
            forwards_per.append(calls)
            rows_per.append(computed)
            canonical = canonical_logprob(a, a_tok, context, text)
            if canonical is not None and got < canonical - 1e-4:
                losses.append(canonical - got)
        rows[name] = {
            "continuations": len(cases),
            "forwards_per_continuation": statistics.mean(forwards_per),
            "prefixes_per_continuation": statistics.mean(rows_per),
            "ms_per_continuation": 1000 * statistics.mean(seconds),
            "lost_canonical": len(losses),
            "max_nats_lost": max(losses, default=0.0),
            "mean_nats_lost": statistics.mean(losses) if losses else 0.0,
        }
        # One screened feature: 10 contexts × 3 continuations, scored under both models.
        rows[name]["s_per_screened_feature"] = 2 * 30 * statistics.mean(seconds)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
