"""Behavioural divergence: does a feature push its model toward text the *other* model would not write?

An exclusive feature can be new in two ways. It can be the owner's own *encoding* of something both models
know (two independently trained models store "end of a sentence about baskets" in different bases, and a
crosscoder at toy or real scale has plenty of those), or it can carry a *behaviour* the other model lacks
(the planted refusal, the paper's CCP-alignment feature). Latent Scaling cannot tell these apart when the
other model has no decoder for the feature; behaviour can. Where the feature fires, remove it (gated, exactly
its own contribution) and see which next tokens lose probability: those are what the feature makes the owner
say. Then ask both models how likely that text is after the same context, each in its own tokenizer:

``divergence = mean over contexts of Σ_t gain(t) · (log P_owner(t | context) − log P_other(t | context))``

where ``gain(t) = p(t) − p_removed(t)`` over the ``top_k`` tokens the feature adds most probability to, and both
log-probabilities score the token's *text* (so different tokenizers compare) floored at ``LOGPROB_FLOOR``.
In nats: high when the feature moves real probability onto continuations the other model finds unlikely;
about zero for a feature that only changes how the owner encodes what both would say anyway; negative when
the feature moves the owner toward the other model.
"""

from __future__ import annotations

import bisect
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfc.behaviour.steering import Steering, encode_prompts, mean_kl, next_token_logprobs
from dfc.lm.hooks import input_device

LOGPROB_FLOOR = math.log(1e-8)
"""Log-probabilities below this count as this: "would not write it" needs no more precision, and the cap keeps
one unseen token from dominating a feature's divergence."""


@dataclass(frozen=True)
class Continuation:
    """One next token a feature makes its model more likely to produce, scored by both models."""

    context: str
    """The prompt as text (the owner's tokens decoded), ending at the token the feature fired on."""
    text: str | None
    """The token as the text it appends to ``context``; None for end-of-text (each model's own EOS token)."""
    gain: float
    """``p(token) − p(token | feature removed)`` under the owner."""
    logprob_owner: float
    """``log P_owner(text | context)`` with the context re-tokenised, as the other model's is (floored)."""
    logprob_other: float | None = None
    """``log P_other(text | context)`` in the other model's tokenizer (floored); None until scored."""

    @property
    def contribution(self) -> float | None:
        """``gain · (log P_owner − log P_other)``: this token's part of the divergence (None until scored)."""
        return None if self.logprob_other is None else self.gain * (self.logprob_owner - self.logprob_other)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RemovalScreen:
    """What removing a feature where it fired changes in its own model, over its top contexts."""

    kl: float
    """Mean next-token ``KL(removed ‖ unsteered)`` at the token the feature fired on."""
    continuations: list[Continuation]
    """Per context, the ``top_k`` tokens whose probability the feature raises most (positive gains only)."""
    n_contexts: int

    def divergence(self) -> float | None:
        """Gain-weighted log-probability advantage of the owner over the other model, in nats per context;
        None until every continuation is scored under the other model (or when there is none to score)."""
        if self.n_contexts == 0 or any(c.logprob_other is None for c in self.continuations):
            return None
        return sum(float(c.contribution) for c in self.continuations) / self.n_contexts  # type: ignore[arg-type]

    def most_divergent(self) -> list[Continuation]:
        """The scored continuations, the largest part of the divergence first."""
        scored = [c for c in self.continuations if c.contribution is not None]
        return sorted(scored, key=lambda c: -float(c.contribution))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "n_contexts": self.n_contexts,
            "divergence": self.divergence(),
            "continuations": [c.to_dict() for c in self.continuations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RemovalScreen:
        return cls(float(data["kl"]), [Continuation(**c) for c in data["continuations"]], int(data["n_contexts"]))


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if isinstance(eos, int) else None


def _appended_text(tokenizer: Any, ids: Tensor, token: int, context: str) -> str | None:
    """The text ``token`` appends after ``ids``: decoding alone drops a leading space some tokenizers encode."""
    if token == _eos_id(tokenizer):
        return None
    full = tokenizer.decode(torch.cat([ids, torch.tensor([token])]).tolist(), skip_special_tokens=True)
    return full[len(context) :] if full.startswith(context) else tokenizer.decode([token], skip_special_tokens=True)


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


# Weak keys: an entry goes with its tokenizer. Keyed by id(), a freed tokenizer's id could be reused by the next
# one loaded, which would then be read with the old vocabulary's texts.
_TEXTS: weakref.WeakKeyDictionary[Any, TokenTexts] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any) -> TokenTexts:
    """``TokenTexts`` of a tokenizer, built once per tokenizer object (a 150k vocabulary takes a few seconds)."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = TokenTexts(tokenizer)
    return texts


class _Forwards:
    """Next-token probabilities by token-id prefix, each computed once: the continuations of one context share
    their first forward passes, and token healing asks for the same prefixes twice."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache, self.calls = model, {}, 0

    def __call__(self, ids: list[int]) -> Tensor:
        key = tuple(ids)
        if key not in self.cache:
            tensor = torch.tensor(ids, dtype=torch.long)[None].to(input_device(self.model))
            logits = self.model(input_ids=tensor, use_cache=False).logits[0, -1].float()
            self.cache[key] = torch.softmax(logits, -1).cpu()
            self.calls += 1
        return self.cache[key]


def _prefix_probability(forward: _Forwards, ids: list[int], text: str, vocab: TokenTexts, budget: list[int]) -> float:
    """P(the text generated after ``ids`` starts with ``text``), summed over every tokenization of it: tokens that
    cover all of ``text``, plus tokens that cover a proper prefix times the rest. ``budget`` caps the prefixes
    visited, most probable first; branches below ``_PRUNE`` are dropped (they cannot move a floored log-prob)."""
    budget[0] -= 1
    p = forward(ids)
    covering = vocab.starting_with(text)
    total = float(p[covering].sum()) if covering else 0.0
    for token, rest in sorted(vocab.strict_prefixes(text), key=lambda tr: -float(p[tr[0]])):
        weight = float(p[token])
        if weight < _PRUNE or budget[0] <= 0:
            continue
        total += weight * _prefix_probability(forward, [*ids, token], rest, vocab, budget)
    return total


_PRUNE = 1e-9
_FORWARD_BUDGET = 12
"""Token prefixes one continuation may visit: a string the model would spell out character by character needs
one per character on the likely path, and the likeliest paths are taken first."""


@torch.no_grad()
def continuation_logprob(
    model: nn.Module, tokenizer: Any, context: str, text: str | None, *, forwards: _Forwards | None = None
) -> float:
    """``log P(text | context)`` under ``model``, however its tokenizer splits the two, floored at ``LOGPROB_FLOOR``.

    The context's last token is backed off and made part of the text ("token healing"), so a context that ends
    mid-word in another tokenizer is not read as a strange split: ``P(text | context) = P(last + text) /
    P(last)`` after the rest, each a prefix probability summed over every tokenization (a word the other
    tokenizer splits differently, or only partly — " f" of " full" — scores what the model would really write).
    ``text`` None scores the model's end-of-text token right after the context as it tokenizes. ``forwards``
    shares forward passes between calls on the same context (``screen_removal`` and ``score_under`` do).
    """
    forward = forwards if forwards is not None else _Forwards(model)
    ids = tokenizer(context)["input_ids"] if context else []
    if text is None:
        eos = _eos_id(tokenizer)
        if eos is None or not ids:
            return LOGPROB_FLOOR
        return max(math.log(max(float(forward(ids)[eos]), 1e-30)), LOGPROB_FLOOR)
    if not text:
        return 0.0
    vocab = token_texts(tokenizer)
    last = vocab.texts[ids[-1]] if ids else ""
    if not last or len(ids) < 2:  # nothing to back off (a special token ends the context): score directly
        if not ids:
            return LOGPROB_FLOOR
        joint, prior = _prefix_probability(forward, ids, text, vocab, [_FORWARD_BUDGET]), 1.0
    else:
        prior = _prefix_probability(forward, ids[:-1], last, vocab, [_FORWARD_BUDGET])
        joint = _prefix_probability(forward, ids[:-1], last + text, vocab, [_FORWARD_BUDGET])
    if joint <= 0 or prior <= 0:
        return LOGPROB_FLOOR
    return max(min(math.log(joint / prior), 0.0), LOGPROB_FLOOR)


def screen_removal(
    model: nn.Module, tokenizer: Any, prompts: list[Tensor], removal: Steering, *, top_k: int = 3
) -> RemovalScreen:
    """Remove a feature (``removal``: gated α = −1, or −s_max·d) at its top contexts and record what it said.

    ``prompts`` are the owner's token ids, each ending at the token the feature fired on; only the last
    position is read. Returns the removal KL and, per prompt, the ``top_k`` tokens the feature adds most
    probability to, each scored by the owner as text (``continuation_logprob``).
    """
    ids = encode_prompts(None, prompts)
    base, removed = next_token_logprobs(model, ids), next_token_logprobs(model, ids, removal)
    continuations: list[Continuation] = []
    for prompt, b, r in zip(ids, base, removed, strict=True):
        gain = b[-1].exp() - r[-1].exp()
        context = tokenizer.decode(prompt.tolist(), skip_special_tokens=True)
        values, tokens = gain.topk(min(top_k, gain.numel()))
        for value, token in zip(values.tolist(), tokens.tolist(), strict=True):
            if value <= 0:
                break
            text = _appended_text(tokenizer, prompt, token, context)
            continuations.append(
                Continuation(context, text, value, continuation_logprob(model, tokenizer, context, text))
            )
    return RemovalScreen(mean_kl(removed, base, last_only=True), continuations, len(ids))


def score_under(model: nn.Module, tokenizer: Any, screen: RemovalScreen) -> RemovalScreen:
    """``screen`` with every continuation scored under the other ``model`` (its own tokenizer)."""
    scored = [
        Continuation(
            c.context, c.text, c.gain, c.logprob_owner, continuation_logprob(model, tokenizer, c.context, c.text)
        )
        for c in screen.continuations
    ]
    return RemovalScreen(screen.kl, scored, screen.n_contexts)
