"""How likely a model finds a piece of text after a context, however its tokenizer splits the two.

Comparing models with different tokenizers means scoring *text*: ``P(text | context)`` sums the probability of
every token sequence that spells the text out. The sum is a search over token prefixes, one forward pass each
(many prefixes per batched pass), exact when its budget covers every branch. It never loses the canonical
tokenization — the tokens the model's own tokenizer gives — because that path is scored first; the rest of the
budget goes best-first by path probability (SCIENCE.md §11). The answer is therefore never below the probability
of the canonical tokens, and a budget only decides how much of the remaining mass is found.
"""

from __future__ import annotations

import bisect
import heapq
import math
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfc.lm.hooks import input_device

LOGPROB_FLOOR = math.log(1e-8)
"""Log-probabilities below this count as this: "would not write it" needs no more precision, and the cap keeps
one unseen token from dominating a comparison."""
SEARCH_BUDGET = 12
"""Token prefixes one search may visit beyond the canonical path, most probable first."""
BATCH_PREFIXES = 8
"""Prefixes expanded per batched forward pass (fewer when a long context or a large vocabulary would make the
logits of a batch exceed ``MAX_LOGITS``)."""
MAX_LOGITS = 1 << 25
"""Logit entries (rows × positions × vocabulary) one batched forward may produce: 128 MiB in float32."""
PRUNE = 1e-9
"""Paths less probable than this are not followed: they cannot move a floored log-probability."""


class TokenTexts:
    """The text every token id of a tokenizer appends to a sequence (leading spaces included), for matching text
    against a vocabulary: which tokens start with a string, which tokens a string starts with."""

    def __init__(self, tokenizer: Any) -> None:
        anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
        base = tokenizer.decode(anchor)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.texts: list[str] = []
        for t in range(len(tokenizer)):
            full = "" if t in special else tokenizer.decode([*anchor, t])
            self.texts.append(full[len(base) :] if full.startswith(base) else "")
        order = sorted((text, t) for t, text in enumerate(self.texts) if text)
        self._sorted = [text for text, _ in order]
        self._ids = [t for _, t in order]
        self._exact: dict[str, list[int]] = {}
        for text, t in order:
            self._exact.setdefault(text, []).append(t)

    def starting_with(self, text: str) -> list[int]:
        """Token ids whose text starts with ``text`` (``text`` itself included)."""
        lo = bisect.bisect_left(self._sorted, text)
        hi = lo
        while hi < len(self._sorted) and self._sorted[hi].startswith(text):
            hi += 1
        return self._ids[lo:hi]

    def strict_prefixes(self, text: str) -> list[tuple[int, str]]:
        """``(token id, rest of text)`` for every token whose text is a proper, non-empty prefix of ``text``."""
        return [(t, text[i:]) for i in range(1, len(text)) for t in self._exact.get(text[:i], [])]

    def spell(self, ids: Sequence[int]) -> str | None:
        """The text ``ids`` append, or None when one of them appends none (a special token)."""
        pieces = [self.texts[t] for t in ids]
        return None if any(not p for p in pieces) else "".join(pieces)


# Weak keys: an entry goes with its tokenizer. Keyed by id(), a freed tokenizer's id could be reused by the next
# one loaded, which would then be read with the old vocabulary's texts.
_TEXTS: weakref.WeakKeyDictionary[Any, TokenTexts] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any) -> TokenTexts:
    """``TokenTexts`` of a tokenizer, built once per tokenizer object (a 150k vocabulary takes a few seconds)."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


class Forwards:
    """Next-token probabilities by token-id prefix, each computed once and many per forward pass.

    Prefixes of one batch are right-padded: under a causal mask a real token never sees the padding after it,
    so each row's last real position is read exactly as if it ran alone. Share one across the calls that score
    continuations of the same context: they ask for the same prefixes.
    """

    def __init__(self, model: nn.Module, batch_size: int = BATCH_PREFIXES) -> None:
        self.model, self.batch_size = model, batch_size
        self.cache: dict[tuple[int, ...], Tensor] = {}
        self.calls = 0
        """Batched forward passes run."""
        self.rows = 0
        """Prefixes computed (rows over all passes)."""

    def __call__(self, ids: Sequence[int]) -> Tensor:
        self.prepare([ids])
        return self.cache[tuple(ids)]

    @torch.no_grad()
    def prepare(self, prefixes: Sequence[Sequence[int]]) -> None:
        """Compute every prefix not yet cached, in as few forward passes as the batch and logit caps allow."""
        missing = list(dict.fromkeys(tuple(p) for p in prefixes if tuple(p) not in self.cache))
        missing.sort(key=len)
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 1)
        device = input_device(self.model)
        start = 0
        while start < len(missing):
            width = len(missing[min(start + self.batch_size, len(missing)) - 1])
            rows = max(1, min(self.batch_size, MAX_LOGITS // max(1, width * vocab)))
            chunk = missing[start : start + rows]
            width = max(len(p) for p in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, prefix in enumerate(chunk):
                batch[i, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
            logits = self.model(input_ids=batch.to(device), use_cache=False).logits
            last = torch.tensor([len(p) - 1 for p in chunk], device=logits.device)
            probs = torch.softmax(logits[torch.arange(len(chunk), device=logits.device), last].float(), -1).cpu()
            for prefix, row in zip(chunk, probs, strict=True):
                self.cache[prefix] = row
            self.calls += 1
            self.rows += len(chunk)
            start += len(chunk)


class PrefixSearch(NamedTuple):
    """P(the text generated after a prefix starts with a string), as far as the search went."""

    probability: float
    """Summed over every tokenization visited: a lower bound of the exact sum, equal to it when ``complete``."""
    canonical: float | None
    """The canonical tokenization's own probability (None when none was given); ``probability`` ≥ it."""
    expanded: int
    """Token prefixes visited (each one row of a forward pass)."""
    complete: bool
    """Whether every branch above ``PRUNE`` was visited."""


def prefix_probability(
    forwards: Forwards,
    ids: Sequence[int],
    text: str,
    vocab: TokenTexts,
    *,
    canonical: Sequence[int] | None = None,
    budget: int = SEARCH_BUDGET,
) -> PrefixSearch:
    """P(the text generated after ``ids`` starts with ``text``), summed over its tokenizations.

    A visited prefix adds the mass of its tokens that cover the rest of ``text`` and offers, as branches, the
    tokens that spell a proper part of it. ``canonical`` (tokens spelling exactly ``text``) is visited first,
    whatever its cost; then up to ``budget`` more prefixes, the most probable path first.
    """
    root = tuple(ids)
    if canonical is not None and vocab.spell(canonical) != text:
        canonical = None
    total = 0.0
    seen: set[tuple[int, ...]] = set()
    heap: list[tuple[float, int, tuple[int, ...], str]] = []
    counter = 0

    def expand(nodes: list[tuple[float, tuple[int, ...], str]]) -> None:
        nonlocal total, counter
        forwards.prepare([root + path for _, path, _ in nodes])
        for weight, path, rest in nodes:
            seen.add(path)
            p = forwards(root + path)
            covering = vocab.starting_with(rest)
            if covering:
                total += weight * float(p[covering].sum())
            for token, tail in vocab.strict_prefixes(rest):
                branch = weight * float(p[token])
                if branch >= PRUNE:
                    counter += 1
                    heapq.heappush(heap, (-branch, counter, (*path, token), tail))

    canonical_p: float | None = None
    if canonical is not None:
        chain = [tuple(canonical[:i]) for i in range(len(canonical))]
        forwards.prepare([root + path for path in chain])
        weight, rest, nodes = 1.0, text, []
        for i, path in enumerate(chain):
            nodes.append((weight, path, rest))
            token = canonical[i]
            weight *= float(forwards(root + path)[token])
            rest = rest[len(vocab.texts[token]) :]
        canonical_p = weight
        expand(nodes)
    else:
        expand([(1.0, (), text)])
    left = budget
    while heap and left > 0:
        batch: list[tuple[float, tuple[int, ...], str]] = []
        while heap and len(batch) < min(forwards.batch_size, left):
            negative, _, path, rest = heapq.heappop(heap)
            if path not in seen:
                batch.append((-negative, path, rest))
        if batch:
            expand(batch)
            left -= len(batch)
    complete = all(path in seen for _, _, path, _ in heap)
    return PrefixSearch(total, canonical_p, len(seen), complete)


class TextScore(NamedTuple):
    """``log P(text | context)`` and the two estimates it is the larger of."""

    logprob: float
    """The score: the larger estimate, floored at ``LOGPROB_FLOOR`` and capped at 0."""
    direct: float
    """``log P(text | the context's own tokens)``: the text's tokenizations after the context as tokenized,
    canonical tokens first, so never below their probability (floored)."""
    healed: float | None
    """With the context's last token backed off and made part of the text ("token healing"):
    ``log P(last + text) − log P(last)`` after the rest, for a context that ends mid-word in this tokenizer;
    None where nothing can be backed off."""
    canonical: float | None
    """``log`` of the canonical tokens' own probability after the context (None when the tokenizer does not
    split context + text at the context's end)."""
    expanded: int
    """Token prefixes the three searches visited."""


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _log(p: float) -> float:
    return max(min(math.log(p), 0.0), LOGPROB_FLOOR) if p > 0 else LOGPROB_FLOOR


@torch.no_grad()
def score_text(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    text: str,
    *,
    forwards: Forwards | None = None,
    budget: int = SEARCH_BUDGET,
) -> TextScore:
    """How likely ``model`` finds ``text`` right after ``context`` (non-empty ``text``; see ``TextScore``).

    The larger of two estimates: directly after the context's tokens, and healed, with the context's last
    token(s) backed off to where this tokenizer's own split of context + text agrees with the context's.
    Either is a sum over tokenizations with the canonical one visited first.
    """
    forward = forwards if forwards is not None else Forwards(model)
    vocab = token_texts(tokenizer)
    ids = list(tokenizer(context)["input_ids"]) if context else []
    if not ids:
        return TextScore(LOGPROB_FLOOR, LOGPROB_FLOOR, None, None, 0)
    full = list(tokenizer(context + text)["input_ids"])
    shared = _common_prefix(ids, full)
    canonical = full[len(ids) :] if shared == len(ids) else None
    direct = prefix_probability(forward, ids, text, vocab, canonical=canonical, budget=budget)
    expanded = direct.expanded
    healed: float | None = None
    back = min(shared, len(ids) - 1)
    tail = vocab.spell(ids[back:]) if back >= 1 else None
    if tail and context.endswith(tail):
        prior = prefix_probability(forward, ids[:back], tail, vocab, canonical=ids[back:], budget=budget)
        joint = prefix_probability(forward, ids[:back], tail + text, vocab, canonical=full[back:], budget=budget)
        expanded += prior.expanded + joint.expanded
        if prior.probability > 0 and joint.probability > 0:
            healed = _log(joint.probability / prior.probability)
        else:
            healed = LOGPROB_FLOOR
    direct_lp = _log(direct.probability)
    best = direct_lp if healed is None else max(direct_lp, healed)
    canonical_lp = None if direct.canonical is None else _log(direct.canonical)
    return TextScore(best, direct_lp, healed, canonical_lp, expanded)


def eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if isinstance(eos, int) else None


@torch.no_grad()
def continuation_logprob(
    model: nn.Module, tokenizer: Any, context: str, text: str | None, *, forwards: Forwards | None = None
) -> float:
    """``log P(text | context)`` under ``model``, however its tokenizer splits the two, floored at ``LOGPROB_FLOOR``
    (``score_text``). ``text`` None scores the model's end-of-text token right after the context as it tokenizes;
    ``forwards`` shares forward passes between calls on the same context."""
    forward = forwards if forwards is not None else Forwards(model)
    if text is None:
        ids = tokenizer(context)["input_ids"] if context else []
        eos = eos_id(tokenizer)
        if eos is None or not ids:
            return LOGPROB_FLOOR
        return _log(float(forward(ids)[eos]))
    if not text:
        return 0.0
    return score_text(model, tokenizer, context, text, forwards=forward).logprob
