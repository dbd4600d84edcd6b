"""Which tokens a feature's decoder direction promotes and suppresses in the model's next-token prediction.

Two estimates: :func:`direct_logit_attribution` reads the direction through the final norm and the
unembedding (cheap, ignores every layer above the hooked one); :func:`steered_token_effects` adds the
direction at its layer and measures the actual change in next-token log-probabilities (slower, causal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfc.behaviour.steering import Prompts, Steering, encode_prompts, mean_logprob_delta, next_token_logprobs
from dfc.lm.hooks import find_decoder_layers


@dataclass(frozen=True)
class TokenEffects:
    """The k most promoted and k most suppressed tokens of a direction, with their effect sizes."""

    top_ids: list[int]
    top_values: list[float]
    bottom_ids: list[int]
    """Most suppressed first."""
    bottom_values: list[float]
    top_tokens: list[str] | None = None
    """Decoded ``top_ids`` when a tokenizer was given."""
    bottom_tokens: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _effects(scores: Tensor, k: int, tokenizer: Any | None) -> TokenEffects:
    k = min(k, scores.numel())
    top, bottom = scores.topk(k), (-scores).topk(k)
    bottom_values = (-bottom.values).tolist()

    def decode(ids: list[int]) -> list[str] | None:
        return None if tokenizer is None else [tokenizer.decode([i]) for i in ids]

    top_ids, bottom_ids = top.indices.tolist(), bottom.indices.tolist()
    return TokenEffects(top_ids, top.values.tolist(), bottom_ids, bottom_values, decode(top_ids), decode(bottom_ids))


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder block (``norm``, ``ln_f``, ``final_layernorm``, …), or None.

    Found without per-architecture names: the first child registered after the decoder-block list, in the
    module that holds that list, whose class is a norm.
    """
    path = find_decoder_layers(model).path
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    after = False
    for child_name, child in parent.named_children():
        if child_name == name:
            after = True
        elif after and ("norm" in type(child).__name__.lower() or isinstance(child, nn.LayerNorm)):
            return child
    return None


@torch.no_grad()
def direct_logit_attribution(
    model: nn.Module,
    direction: Tensor,
    *,
    k: int = 10,
    mean_activation: Tensor | None = None,
    tokenizer: Any | None = None,
) -> TokenEffects:
    """Logit change of ``direction`` read through the final norm and the unembedding.

    The norm is not linear, so its effect is taken as ``norm(m + direction) − norm(m)`` around
    ``m = mean_activation`` (a typical residual vector at the hooked layer; give the raw-scale direction
    times ``s_max`` so its size relative to ``m`` is right). Without ``m`` it is ``norm(direction) − norm(0)``:
    the norm's gain (and centring) applied to the direction, whose scale then no longer matters.
    """
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings; load it with its LM head")
    weight = unembed.weight.detach().float()
    d = direction.detach().float().to(weight.device).reshape(-1)
    if d.shape[0] != weight.shape[1]:
        raise ValueError(f"direction has {d.shape[0]} dimensions but the unembedding expects {weight.shape[1]}")
    norm = find_final_norm(model)
    if norm is None:
        h = d
    else:
        base = torch.zeros_like(d) if mean_activation is None else mean_activation.detach().float().to(d.device)
        dtype = next(norm.parameters(), weight).dtype
        h = (norm((base + d).to(dtype)[None]) - norm(base.to(dtype)[None]))[0].float()
    return _effects((weight @ h).cpu(), k, tokenizer)


def steered_token_effects(
    model: nn.Module,
    tokenizer: Any | None,
    layer_index: int,
    direction: Tensor,
    scale: float,
    prompts: Prompts,
    *,
    alpha: float = 1.0,
    k: int = 10,
) -> TokenEffects:
    """Mean change of every token's next-token log-probability when ``alpha · scale · direction`` is added.

    Averaged over all positions of ``prompts``; use prompts where the feature is *not* already active to
    see what adding it does (or ``alpha < 0`` on its own contexts to see what it was doing).
    """
    ids = encode_prompts(tokenizer, prompts)
    spec = Steering(layer_index, direction, float(alpha), float(scale))
    delta = mean_logprob_delta(next_token_logprobs(model, ids, spec), next_token_logprobs(model, ids))
    return _effects(delta, k, tokenizer)
