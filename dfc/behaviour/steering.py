"""Steering: add a feature's decoder direction to a model's residual stream and measure what changes (SCIENCE.md §8–9).

Everything here works in *raw* activation scale, the scale the model itself uses: a crosscoder's
decoder rows are divided by its normalisation scale (``Crosscoder.decoder_directions(raw_scale=True)``)
before they are added, so ``α · s_max · d_i`` is the feature's own contribution at ``α = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from dfc.crosscoder import Crosscoder
from dfc.lm.hooks import block_hidden_state, find_decoder_layers, input_device, with_block_hidden_state

Side = Literal["a", "b"]
Prompts = Sequence[str] | Sequence[Tensor]
"""Prompt texts (encoded with the tokenizer, special tokens included) or 1-D token-id tensors."""


class SteeringError(ValueError):
    """A steering vector or coefficient that cannot be applied."""


@dataclass(frozen=True)
class FeatureGate:
    """Where an exclusive feature fires and how strongly, computed from its own model's raw activations.

    An exclusive feature's encoder reads only its model, so its activation is known while that model
    runs alone; a shared feature would need the other model's activation at the same token too.
    """

    encoder: Tensor
    """Raw-scale encoder row: the crosscoder's row times the model's normalisation scale."""
    bias: float
    threshold: float
    """Smallest activation that counts as firing (the learned inference threshold; 0 if none)."""

    @classmethod
    def of(cls, crosscoder: Crosscoder, feature: int) -> FeatureGate:
        """The gate of an A-only or B-only feature of ``crosscoder``."""
        c = crosscoder.config
        if feature in c.a_only_features:
            row, scale = crosscoder.w_enc_a[feature], crosscoder.scale_a
        elif feature in c.b_only_features:
            row, scale = crosscoder.w_enc_b[feature - crosscoder.b_offset], crosscoder.scale_b
        else:
            raise ValueError(f"feature {feature} is not exclusive; only exclusive features can be gated per model")
        norms = crosscoder.decoder_norms()
        total = float(norms.a[feature] + norms.b[feature])
        # Inference keeps a feature when activation · Σ‖d‖ clears the learned score threshold.
        learned = float(crosscoder.thresholds[0])
        threshold = learned / max(total, 1e-12) if learned > 0 else 0.0
        return cls((row.detach().float() * scale).cpu(), float(crosscoder.b_enc.detach()[feature]), threshold)

    def activation(self, hidden: Tensor) -> Tensor:
        """``[..., 1]`` feature activation at each position (0 where it does not fire)."""
        pre = (hidden.float() @ self.encoder.to(hidden.device) + self.bias).relu()
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))[..., None]


@dataclass(frozen=True)
class Steering:
    """What to add where: ``alpha · scale · direction`` at the output of decoder block ``layer_index``."""

    layer_index: int
    """Decoder block whose output (the residual stream) is steered."""
    direction: Tensor
    """Raw-scale direction, e.g. a feature's decoder vector for this model."""
    alpha: float
    """Steering coefficient: negative suppresses, positive amplifies."""
    scale: float = 1.0
    """Size of one unit of ``alpha``, e.g. the feature's maximum activation ``s_max``."""
    gate: FeatureGate | None = None
    """If set, add ``alpha · f(x) · direction`` only where the feature fires (α = −1 removes it) instead."""

    @property
    def vector(self) -> Tensor:
        """The vector added at every position (ungated steering)."""
        return self.direction * (self.alpha * self.scale)


def _check_finite(direction: Tensor, alpha: float, scale: float) -> None:
    """Reject bad inputs before any forward pass runs, naming the culprit."""
    if not math.isfinite(alpha):
        raise SteeringError(f"steering coefficient α={alpha} is not finite; use a finite number such as -1.5 or 2")
    if not math.isfinite(scale):
        raise SteeringError(f"steering scale {scale} is not finite; pass the feature's maximum activation s_max")
    if direction.ndim != 1:
        raise SteeringError(f"a steering direction must be a 1-D vector, got shape {tuple(direction.shape)}")
    if not torch.isfinite(direction).all():
        raise SteeringError("the steering direction contains NaN or inf; check the crosscoder's weights and scales")


@contextmanager
def steer(
    model: nn.Module,
    layer_index: int,
    direction: Tensor,
    alpha: float,
    scale: float = 1.0,
    *,
    gate: FeatureGate | None = None,
) -> Iterator[Steering]:
    """Add ``alpha · scale · direction`` to the output of decoder block ``layer_index`` at every position.

    With a ``gate``, add ``alpha · f(x) · direction`` instead, where ``f(x)`` is the gated feature's activation
    at that position (zero where it does not fire). The hook is removed when the ``with`` block ends, also
    when it raises. Steered activations that become non-finite raise :class:`SteeringError`.
    """
    _check_finite(direction, alpha, scale)
    layers = find_decoder_layers(model).layers
    if not 0 <= layer_index < len(layers):
        raise SteeringError(f"layer {layer_index} is out of range: the model has {len(layers)} decoder blocks")
    spec = Steering(layer_index, direction.detach(), float(alpha), float(scale), gate)
    vector = spec.vector if gate is None else spec.direction * spec.alpha

    def add(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = block_hidden_state(output)
        if hidden.shape[-1] != vector.shape[0]:
            raise SteeringError(
                f"steering vector has {vector.shape[0]} dimensions but layer {layer_index} outputs "
                f"{hidden.shape[-1]}; was the direction taken from the other model's decoder?"
            )
        delta = vector.to(device=hidden.device, dtype=hidden.dtype)
        if gate is not None:
            delta = gate.activation(hidden).to(hidden.dtype) * delta
        steered = hidden + delta
        if not torch.isfinite(steered).all():
            raise SteeringError(
                f"steering coefficient α={alpha} produced non-finite activations at layer {layer_index}; "
                "use a smaller |α| or compute in float32"
            )
        try:
            return with_block_hidden_state(output, steered)
        except TypeError as exc:
            raise SteeringError(f"cannot steer: {exc}") from None

    handle = layers[layer_index].register_forward_hook(add)
    try:
        yield spec
    finally:
        handle.remove()


@contextmanager
def _maybe_steer(model: nn.Module, steering: Steering | None) -> Iterator[None]:
    if steering is None:
        yield
        return
    with steer(model, steering.layer_index, steering.direction, steering.alpha, steering.scale, gate=steering.gate):
        yield


def encode_prompts(tokenizer: Any | None, prompts: Prompts) -> list[Tensor]:
    """Token ids of each prompt; strings need a tokenizer, tensors pass through."""
    encoded: list[Tensor] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass one or give token-id tensors")
            prompt = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
        if prompt.ndim != 1 or prompt.numel() == 0:
            raise ValueError(f"a prompt must be a non-empty 1-D token-id tensor, got shape {tuple(prompt.shape)}")
        encoded.append(prompt.long())
    if not encoded:
        raise ValueError("no prompts given")
    return encoded


@torch.no_grad()
def next_token_logprobs(model: nn.Module, prompts: list[Tensor], steering: Steering | None = None) -> list[Tensor]:
    """``[seq, vocab]`` float32 next-token log-probabilities at every position of each prompt."""
    device = input_device(model)
    out: list[Tensor] = []
    with _maybe_steer(model, steering):
        for ids in prompts:  # one prompt at a time: no padding, so every position is exact
            logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return out


def mean_kl(steered: list[Tensor], base: list[Tensor], last_only: bool = False) -> float:
    """Mean over prompts of the per-position mean ``KL(steered || base)`` (or of the last position's)."""
    per_position = [(s.exp() * (s - b)).sum(-1).clamp_min(0) for s, b in zip(steered, base, strict=True)]
    return float(torch.stack([kl[-1] if last_only else kl.mean() for kl in per_position]).mean())


def mean_logprob_delta(steered: list[Tensor], base: list[Tensor], last_only: bool = False) -> Tensor:
    """``[vocab]`` mean change of log-probabilities over positions (or last positions) of all prompts."""
    rows = [(s - b)[-1:] if last_only else (s - b) for s, b in zip(steered, base, strict=True)]
    return torch.cat(rows).mean(0)


def next_token_kl(
    model: nn.Module, tokenizer: Any | None, prompts: Prompts, steering: Steering, *, last_only: bool = False
) -> float:
    """``KL(steered ‖ unsteered)`` of the next-token distribution, averaged over positions, then prompts.

    ``last_only`` scores just each prompt's final position, e.g. a context cut right after a feature fired.
    """
    ids = encode_prompts(tokenizer, prompts)
    return mean_kl(next_token_logprobs(model, ids, steering), next_token_logprobs(model, ids), last_only)


class LogprobChange(NamedTuple):
    """Change of chosen tokens' next-token log-probabilities under steering."""

    token_ids: Tensor
    delta: Tensor
    """Per token: steered minus unsteered log-probability, averaged over positions and prompts."""

    @property
    def mean(self) -> float:
        """Mean change over the chosen tokens."""
        return float(self.delta.mean())


def logprob_change(
    model: nn.Module,
    tokenizer: Any | None,
    prompts: Prompts,
    token_ids: Sequence[int] | Tensor,
    steering: Steering,
    *,
    last_only: bool = False,
) -> LogprobChange:
    """Mean change of the log-probability of ``token_ids`` as the next token (every position, or the last)."""
    ids = encode_prompts(tokenizer, prompts)
    chosen = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    delta = mean_logprob_delta(next_token_logprobs(model, ids, steering), next_token_logprobs(model, ids), last_only)
    return LogprobChange(chosen, delta[chosen])


class Generation(NamedTuple):
    """A greedy continuation as text, and the tokens it was made of (each decoded alone, special ones kept), so a
    reader can tell "ended the text at once" from "wrote only whitespace"."""

    text: str
    tokens: list[str]


def greedy_continuations(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, steering: Steering | None = None
) -> list[str]:
    """Greedy (deterministic) continuation of each prompt, steered at every position including new ones."""
    return [g.text for g in greedy_generations(model, tokenizer, prompts, max_new_tokens, steering)]


@torch.no_grad()
def greedy_generations(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, steering: Steering | None = None
) -> list[Generation]:
    """``greedy_continuations`` with the generated tokens of each."""
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[Generation] = []
    with _maybe_steer(model, steering):
        for ids in encode_prompts(tokenizer, prompts):
            out = model.generate(
                input_ids=ids[None].to(device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            new = out[0, len(ids) :].tolist()
            texts.append(Generation(tokenizer.decode(new, skip_special_tokens=True),
                                    [tokenizer.decode([t], skip_special_tokens=False) for t in new]))  # fmt: skip
    return texts


@dataclass(frozen=True)
class SweepPoint:
    """What one steering coefficient did."""

    alpha: float
    kl_feature: float
    """``KL(steered ‖ unsteered)`` on the prompts where the feature is active."""
    kl_neutral: float
    """The same on unrelated prompts: a clean feature leaves these alone."""
    promoted_logprob_change: float | None
    """Mean change of the promoted tokens' log-probabilities on the feature prompts (None without tokens)."""
    continuations: list[str]
    """Greedy continuation of each probe prompt under this coefficient."""
    continuation_tokens: list[list[str]] = field(default_factory=list)
    """The tokens of each continuation (``Generation.tokens``)."""


@dataclass(frozen=True)
class SteeringSweep:
    """A steering sweep over coefficients, with the unsteered continuations to compare against."""

    layer_index: int
    s_max: float
    probe_prompts: list[str]
    unsteered: list[str]
    points: list[SweepPoint]
    unsteered_tokens: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steering_sweep(
    model: nn.Module,
    tokenizer: Any,
    layer_index: int,
    direction: Tensor,
    s_max: float,
    alphas: Sequence[float],
    *,
    feature_prompts: Prompts,
    neutral_prompts: Prompts,
    promoted_token_ids: Sequence[int] | Tensor | None = None,
    probe_prompts: Sequence[str] = (),
    max_new_tokens: int = 20,
    gate: FeatureGate | None = None,
) -> SteeringSweep:
    """Steer with each ``α`` in turn; record KL on feature and neutral prompts, Δlog-prob and continuations.

    With a ``gate`` each ``α`` scales the feature's own activation where it fires (``s_max`` is then unused).
    """
    for alpha in alphas:  # fail before the first forward pass, not halfway through a sweep
        _check_finite(direction, float(alpha), s_max)
    feature_ids, neutral_ids = encode_prompts(tokenizer, feature_prompts), encode_prompts(tokenizer, neutral_prompts)
    base_feature, base_neutral = next_token_logprobs(model, feature_ids), next_token_logprobs(model, neutral_ids)
    promoted = None if promoted_token_ids is None else torch.as_tensor(promoted_token_ids, dtype=torch.long)
    unsteered = greedy_generations(model, tokenizer, probe_prompts, max_new_tokens) if probe_prompts else []
    points: list[SweepPoint] = []
    for alpha in alphas:
        spec = Steering(layer_index, direction, float(alpha), float(s_max), gate)
        steered_feature = next_token_logprobs(model, feature_ids, spec)
        steered = greedy_generations(model, tokenizer, probe_prompts, max_new_tokens, spec) if probe_prompts else []
        change = None
        if promoted is not None and promoted.numel():
            change = float(mean_logprob_delta(steered_feature, base_feature)[promoted].mean())
        points.append(
            SweepPoint(
                alpha=float(alpha),
                kl_feature=mean_kl(steered_feature, base_feature),
                kl_neutral=mean_kl(next_token_logprobs(model, neutral_ids, spec), base_neutral),
                promoted_logprob_change=change,
                continuations=[g.text for g in steered],
                continuation_tokens=[g.tokens for g in steered],
            )
        )
    return SteeringSweep(layer_index, float(s_max), list(probe_prompts), [g.text for g in unsteered], points,
                         [g.tokens for g in unsteered])  # fmt: skip


def raw_decoder(crosscoder: Crosscoder, side: Side, features: Sequence[int] | Tensor) -> Tensor:
    """``[len(features), d_side]`` raw-scale decoder rows of ``side`` (every feature must be owned by it)."""
    c = crosscoder.config
    feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    owned = c.features_a if side == "a" else c.features_b
    outside = [int(f) for f in feats if int(f) not in owned]
    if outside:
        raise ValueError(f"features {outside[:5]} have no decoder for model {side.upper()}")
    with torch.no_grad():
        if side == "a":
            return crosscoder.w_dec_a.detach().float()[feats] / crosscoder.scale_a
        return crosscoder.decoder_b().detach().float()[feats - crosscoder.b_offset] / crosscoder.scale_b
