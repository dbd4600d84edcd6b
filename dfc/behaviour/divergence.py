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
log-probabilities score the token's *text* (so different tokenizers compare; ``dfc.lm.scoring``) floored at
``LOGPROB_FLOOR``.
In nats: high when the feature moves real probability onto continuations the other model finds unlikely;
about zero for a feature that only changes how the owner encodes what both would say anyway; negative when
the feature moves the owner toward the other model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfc.behaviour.steering import Steering, encode_prompts, mean_kl, next_token_logprobs
from dfc.lm.scoring import LOGPROB_FLOOR, Forwards, continuation_logprob, eos_id, token_texts

__all__ = [
    "LOGPROB_FLOOR",
    "Continuation",
    "RemovalScreen",
    "continuation_logprob",
    "score_under",
    "screen_removal",
    "token_texts",
]


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


def _appended_text(tokenizer: Any, ids: Tensor, token: int, context: str) -> str | None:
    """The text ``token`` appends after ``ids``: decoding alone drops a leading space some tokenizers encode."""
    if token == eos_id(tokenizer):
        return None
    full = tokenizer.decode(torch.cat([ids, torch.tensor([token])]).tolist(), skip_special_tokens=True)
    return full[len(context) :] if full.startswith(context) else tokenizer.decode([token], skip_special_tokens=True)


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
        forwards = Forwards(model)
        values, tokens = gain.topk(min(top_k, gain.numel()))
        for value, token in zip(values.tolist(), tokens.tolist(), strict=True):
            if value <= 0:
                break
            text = _appended_text(tokenizer, prompt, token, context)
            continuations.append(
                Continuation(
                    context, text, value, continuation_logprob(model, tokenizer, context, text, forwards=forwards)
                )
            )
    return RemovalScreen(mean_kl(removed, base, last_only=True), continuations, len(ids))


def score_under(model: nn.Module, tokenizer: Any, screen: RemovalScreen) -> RemovalScreen:
    """``screen`` with every continuation scored under the other ``model`` (its own tokenizer)."""
    by_context: dict[str, Forwards] = {}
    scored = [
        Continuation(
            c.context,
            c.text,
            c.gain,
            c.logprob_owner,
            continuation_logprob(
                model, tokenizer, c.context, c.text, forwards=by_context.setdefault(c.context, Forwards(model))
            ),
        )
        for c in screen.continuations
    ]
    return RemovalScreen(screen.kl, scored, screen.n_contexts)
