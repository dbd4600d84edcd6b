"""Attribution of a divergent context (``dfc.behaviour.scan``): which vector, removed from the owner's residual stream
at the context's last token alone, closes its gap.

The pipeline offers each feature active there (exclusive or shared, of any seed) as ``activation · decoder direction``
from the stored paired activations, so a shared feature works too: a per-model gate could not compute it. The other
model is untouched: ``gap_after = Σ_t p'(t) · (logprob_owner(t) + log p'(t) − log p(t) − logprob_other(t))``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfc.behaviour.scan import DivergentContext, Prediction
from dfc.lm.hooks import block_hidden_state, find_decoder_layers, input_device, with_block_hidden_state
from dfc.lm.scoring import LOGPROB_FLOOR, MAX_LOGITS


class Attribution(NamedTuple):
    """How much of a context's gap removing one vector at the context's last token closes."""

    key: Any
    """The candidate's label, as given: anything JSON can write (a feature id, a dict naming run and feature)."""
    closes: float
    """``(gap_before − gap_after) / gap_before``: 1 closes the gap, 0 does nothing, negative widens it."""
    gap_before: float
    gap_after: float
    probs_after: tuple[float, ...]
    """``p'_owner(t)`` of the prediction's tokens with the vector removed."""

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


@torch.no_grad()
def _last_logprobs_removed(model: nn.Module, layer: int, ids: Tensor, vectors: Tensor, last_only: bool) -> Tensor:
    """``[len(vectors), vocab]`` next-token log-probabilities after ``ids``, row r with ``vectors[r]`` subtracted from
    the output of decoder block ``layer`` at the last position only."""

    def remove(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = block_hidden_state(output)
        if hidden.shape[-1] != vectors.shape[-1]:
            raise ValueError(f"candidate vectors have {vectors.shape[-1]} dimensions but layer {layer} outputs "
                             f"{hidden.shape[-1]}; were they taken from the other model's decoder?")  # fmt: skip
        changed = hidden.clone()
        changed[:, -1] -= vectors.to(device=hidden.device, dtype=hidden.dtype)
        return with_block_hidden_state(output, changed)

    kwargs = {"logits_to_keep": 1} if last_only else {}
    handle = find_decoder_layers(model).layers[layer].register_forward_hook(remove)
    try:
        batch = ids[None].repeat(len(vectors), 1).to(input_device(model))
        logits = model(input_ids=batch, use_cache=False, **kwargs).logits[:, -1]
    finally:
        handle.remove()
    return torch.log_softmax(logits.float(), -1).cpu()


def attribute(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    target: DivergentContext | Prediction,
    candidates: Sequence[tuple[Any, Tensor]],
    *,
    context_ids: Tensor | None = None,
    batch_size: int = 16,
) -> list[Attribution]:
    """How much of ``target``'s gap each candidate closes when the owner ``model`` runs without it, best first.

    Each candidate is a raw-scale vector (e.g. a feature's ``activation · decoder direction`` there) subtracted from
    the output of decoder block ``layer`` at the context's last token only; the other model is untouched:
    ``gap_after = Σ_t p'(t) · (logprob_owner(t) + log p'(t) − log p(t) − logprob_other(t))``. The context is
    ``context_ids`` (pass the owner's document ids up to its position, where stored activations were read) or else
    the context text tokenised as the scorer does; ``p`` is recomputed on it, so a zero vector closes exactly 0.
    """
    p = target.prediction if isinstance(target, DivergentContext) else target
    if p.logprob_other is None or p.context is None:
        raise ValueError("attribute needs an exactly scored context; run score_exact on it first")
    layers = find_decoder_layers(model).layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} decoder blocks")
    size = candidates[0][1].numel() if candidates else int(model.get_input_embeddings().weight.shape[1])
    for key, vector in candidates:
        if vector.ndim != 1 or vector.numel() != size or not torch.isfinite(vector).all():
            raise ValueError(f"candidate {key!r} must be a finite 1-D vector of {size} dimensions like the first, "
                             f"got shape {tuple(vector.shape)}")  # fmt: skip
    ids = torch.as_tensor(tokenizer(p.context)["input_ids"] if context_ids is None else context_ids, dtype=torch.long)
    tokens = torch.tensor(p.token_ids, dtype=torch.long)
    owner, other = torch.tensor(p.logprob_owner), torch.tensor(p.logprob_other)
    counted = torch.tensor(p.other_spells or (True,) * len(p.texts), dtype=torch.float32)  # as ``Prediction.gap``
    last_only = "logits_to_keep" in inspect.signature(model.forward).parameters  # else logits at every position
    vocab = int(model.get_output_embeddings().weight.shape[0])
    rows = max(1, min(batch_size, MAX_LOGITS // max(1, (1 if last_only else len(ids)) * vocab)))
    base = _last_logprobs_removed(model, layer, ids, torch.zeros(1, size), last_only)[0, tokens]
    base = base.clamp_min(LOGPROB_FLOOR)
    gap_before = float((counted * base.exp() * (owner - other)).sum())
    if gap_before <= 0:
        raise ValueError(f"the context's gap is {gap_before:.3g} nats here; only a positive gap can be closed")
    out: list[Attribution] = []
    for start in range(0, len(candidates), rows):
        chunk = candidates[start : start + rows]
        after = _last_logprobs_removed(model, layer, ids, torch.stack([v.float() for _, v in chunk]), last_only)
        after = after[:, tokens].clamp_min(LOGPROB_FLOOR)
        gaps = (counted * after.exp() * (owner + after - base - other)).sum(-1).tolist()
        for (key, _), gap, probs in zip(chunk, gaps, after.exp().tolist(), strict=True):
            out.append(Attribution(key, (gap_before - gap) / gap_before, gap_before, gap, tuple(probs)))
    return sorted(out, key=lambda a: -a.closes)
