"""Carrying a steering vector of one model to the other through the crosscoder's shared features (SCIENCE.md §9),
and building such a vector from contrasting prompts.

Shared features have a decoder in both models: a vector of the source model is matched to the shared decoders it
points along and rebuilt from the same features' decoders in the target, so a behaviour steered in one model can
be looked for in the other even when their widths differ. All vectors are in raw activation scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfc.behaviour.steering import Side, encode_prompts, raw_decoder
from dfc.crosscoder import Crosscoder
from dfc.lm.hooks import capture_activations


def contrast_vector(model: nn.Module, tokenizer: Any, layer: int, positive: Sequence[str],
                    negative: Sequence[str]) -> Tensor:  # fmt: skip
    """Mean residual stream at ``layer`` over every token of the ``positive`` prompts minus the same over the
    ``negative`` ones (a difference-of-means steering vector, e.g. a persona vector), in raw scale.

    Special tokens (BOS…) are run but not averaged: their activations are outliers whose share of the mean would
    depend on the prompts' lengths rather than on what they say.
    """
    if not positive or not negative:
        raise ValueError("a contrast vector needs positive and negative prompts")
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)

    def mean(prompts: Sequence[str]) -> Tensor:
        total, count = None, 0
        for ids in encode_prompts(tokenizer, list(prompts)):
            acts = capture_activations(model, ids[None], None, layer).activations[0].float().cpu()
            acts = acts[~torch.isin(ids.cpu(), special)]
            total = acts.sum(0) if total is None else total + acts.sum(0)
            count += acts.shape[0]
        if total is None or count == 0:
            raise ValueError("the prompts have no tokens besides special ones")
        return total / count

    return mean(positive) - mean(negative)


class TransferResult(NamedTuple):
    """A steering vector carried to the other model through shared features (SCIENCE.md §9)."""

    vector: Tensor
    """The transferred vector in the target model's raw activation scale."""
    features: Tensor
    """The shared features it was built from, best match first."""
    weights: Tensor
    """Their weights ``cos(d_i^source, v_source)``."""

    @property
    def v_b(self) -> Tensor:
        """Alias of ``vector`` for the usual A → B direction."""
        return self.vector


def transfer_steering_vector(
    crosscoder: Crosscoder, v_source: Tensor, n: int = 10, *, source: Side = "a"
) -> TransferResult:
    """Top ``n`` shared features by ``w_i = cos(d_i^source, v)``; ``v' = Σ w_i d_i^target / Σ w_i`` at ``‖v‖``."""
    shared = torch.tensor(list(crosscoder.config.shared), dtype=torch.long)
    if len(shared) == 0:
        raise ValueError("this crosscoder has no shared features to carry a vector across")
    v = v_source.detach().float().reshape(-1)
    if not torch.isfinite(v).all() or float(v.norm()) == 0:
        raise ValueError("the source steering vector must be finite and non-zero")
    target: Side = "b" if source == "a" else "a"
    d_source = raw_decoder(crosscoder, source, shared)
    if d_source.shape[1] != v.shape[0]:
        raise ValueError(f"v has {v.shape[0]} dimensions but model {source.upper()} has {d_source.shape[1]}")
    cos = (d_source @ v) / (d_source.norm(dim=1) * v.norm()).clamp_min(1e-12)
    top = cos.topk(min(n, len(shared)))
    if float(top.values.sum()) <= 0:
        raise ValueError("no shared feature points along the source vector (Σ cos ≤ 0); nothing to transfer")
    d_target = raw_decoder(crosscoder, target, shared[top.indices])
    combined = (top.values[:, None] * d_target).sum(0) / top.values.sum()
    vector = combined * (v.norm() / combined.norm().clamp_min(1e-12))
    return TransferResult(vector, shared[top.indices], top.values)
