"""Capture the residual stream of a decoder-only LM at one layer, stopping the forward pass right after it.

The capture at layer L is the output of decoder block L, i.e. `output_hidden_states[L + 1]` of a full
forward pass. One exception, by design: transformers replaces the *last* entry of `hidden_states` with the
output of the final norm, whereas the capture here is always the raw (pre-norm) residual stream, so the
last layer is treated like every other one across architectures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

LayerSpec = int | str
"""A layer index (negative counts from the end), a decimal string of one, or "middle"."""


class LayerSpecError(ValueError):
    """A layer spec that names no layer of the model."""


class _StopForward(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by the capture hook to end the forward pass right after the hooked layer."""


class DecoderLayers(NamedTuple):
    """The stack of decoder blocks of a model and where it lives in the module tree."""

    path: str
    layers: nn.ModuleList


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Find the decoder block list: the homogeneous `nn.ModuleList` holding the most parameters.

    Parameter count (not length) picks the stack of blocks over per-block lists such as MoE experts, and
    over a smaller vision tower in multimodal models, without a branch per architecture.
    """
    best: DecoderLayers | None = None
    best_size = -1
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = DecoderLayers(path, module), size
    if best is None:
        raise ValueError(f"found no list of decoder blocks in {type(model).__name__}")
    return best


def resolve_layer(spec: LayerSpec, n_layers: int) -> int:
    """Turn a layer spec into a non-negative block index, or raise `LayerSpecError` naming the spec."""
    if isinstance(spec, str):
        if spec.strip().lower() == "middle":
            return n_layers // 2
        try:
            spec = int(spec.strip())
        except ValueError:
            raise LayerSpecError(
                f"layer {spec!r} is not an integer index or 'middle' (the model has {n_layers} layers)"
            ) from None
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise LayerSpecError(f"layer {spec!r} is not an integer index or 'middle'")
    if not -n_layers <= spec < n_layers:
        raise LayerSpecError(
            f"layer {spec} is out of range: the model has {n_layers} layers, so use 0..{n_layers - 1} "
            f"or -{n_layers}..-1 (or 'middle')"
        )
    return spec % n_layers


def block_hidden_state(output: Any) -> torch.Tensor:
    """The residual-stream tensor of a block's output: transformers 5 returns a tensor, older code a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):  # a ModelOutput
        return block_hidden_state(output.to_tuple())
    raise TypeError(f"cannot find the hidden state in a block output of type {type(output).__name__}")


def with_block_hidden_state(output: Any, hidden: torch.Tensor) -> Any:
    """A block's output with its residual-stream tensor replaced (what a forward hook returns to change it)."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"cannot change the hidden state of a block output of type {type(output).__name__}")


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embeddings (CPU if they are offloaded)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    weight = get_emb().weight if get_emb is not None else next(model.parameters())
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


@dataclass
class ResidualHook:
    """A live hook on one decoder block; `forward` runs the model and returns that block's output."""

    model: nn.Module
    layer: int
    n_layers: int
    stop_early: bool
    activation: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on a batch and return the hooked block's output `[batch, seq, d_model]`."""
        self.activation = None
        device = input_device(self.model)
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
        # The base model skips the LM head, whose vocab-sized matmul a full pass would otherwise pay for.
        runner = getattr(self.model, "base_model", self.model)
        # no_grad, not inference_mode: inference tensors cannot later be saved for a backward pass.
        with torch.no_grad(), suppress(_StopForward):
            runner(**kwargs)
        if self.activation is None:
            raise RuntimeError(f"the forward pass never reached layer {self.layer}")
        return self.activation


@contextmanager
def hook_residual_stream(model: nn.Module, layer: LayerSpec, *, stop_early: bool = True) -> Iterator[ResidualHook]:
    """Hook the output of decoder block `layer` while the `with` block runs; the hook is always removed.

    With `stop_early` the forward pass ends right after that block, so the blocks above cost nothing.
    """
    layers = find_decoder_layers(model)
    index = resolve_layer(layer, len(layers.layers))
    hook = ResidualHook(model=model, layer=index, n_layers=len(layers.layers), stop_early=stop_early)

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        hook.activation = block_hidden_state(output).detach()
        if hook.stop_early:
            raise _StopForward

    handle = layers.layers[index].register_forward_hook(capture)
    try:
        yield hook
    finally:
        handle.remove()


class CapturedActivations(NamedTuple):
    """Residual-stream activations of a padded batch at one layer."""

    activations: torch.Tensor
    """`[batch, seq, d_model]`, pad positions included (they hold garbage)."""
    attention_mask: torch.Tensor
    """`[batch, seq]`, 1 for real tokens."""
    layer: int
    """Non-negative index of the hooked block."""

    def per_sequence(self) -> list[torch.Tensor]:
        """Real-token activations of each row, `[n_real_tokens, d_model]`, pads removed."""
        mask = self.attention_mask.to(self.activations.device).bool()
        return [acts[row_mask] for acts, row_mask in zip(self.activations, mask, strict=True)]


def capture_activations(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: LayerSpec,
    *,
    stop_early: bool = True,
) -> CapturedActivations:
    """Run one batch through `model` and return the residual stream at `layer`."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with hook_residual_stream(model, layer, stop_early=stop_early) as hook:
        acts = hook.forward(input_ids, attention_mask)
        return CapturedActivations(acts, attention_mask, hook.layer)


# --- documents: tokenise with offsets, batch with right padding, return real tokens only -----------------


@dataclass(frozen=True)
class TokenizedDocument:
    """One document's tokens with character offsets into its text."""

    index: int
    """Position of the document in the input stream."""
    token_ids: torch.Tensor
    """`[n_tokens]` int64."""
    offsets: torch.Tensor
    """`[n_tokens, 2]` int64 character spans; special tokens have (0, 0)."""
    special_mask: torch.Tensor
    """`[n_tokens]` bool, True for special tokens (BOS, EOS, …) that callers usually drop."""
    n_dropped: int = 0
    """Tokens cut off the end by truncation to `max_length`."""


def tokenize_document(
    tokenizer: Any,
    text: str,
    index: int = 0,
    *,
    max_length: int | None = None,
    add_special_tokens: bool = True,
) -> TokenizedDocument:
    """Tokenise one text with offsets; keep at most `max_length` tokens (the rest is counted, not kept)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need one")
    enc = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        truncation=False,
    )
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    # Special tokens typed into the text are not flagged by every tokenizer's mask: flag them by id too.
    special = torch.tensor(enc["special_tokens_mask"], dtype=torch.bool)
    special |= torch.isin(ids, torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long))
    n_dropped = 0
    if max_length is not None and len(ids) > max_length:
        n_dropped = len(ids) - max_length
        ids, offsets, special = ids[:max_length], offsets[:max_length], special[:max_length]
    return TokenizedDocument(index, ids, offsets, special, n_dropped)


def iter_token_batches(
    docs: Iterable[TokenizedDocument], *, batch_size: int, max_tokens_per_batch: int
) -> Iterator[list[TokenizedDocument]]:
    """Group documents in order into batches of at most `batch_size` rows and `max_tokens_per_batch` tokens.

    Tokens are counted after padding; a document longer than the budget still forms a batch of its own.
    """
    batch: list[TokenizedDocument] = []
    longest = 0
    for doc in docs:
        n = len(doc.token_ids)
        if batch and (len(batch) + 1 > batch_size or max(longest, n) * (len(batch) + 1) > max_tokens_per_batch):
            yield batch
            batch, longest = [], 0
        batch.append(doc)
        longest = max(longest, n)
    if batch:
        yield batch


class PaddedBatch(NamedTuple):
    """Right-padded token ids and their attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def pad_right(sequences: Sequence[torch.Tensor], pad_token_id: int) -> PaddedBatch:
    """Right-pad 1-D id tensors; right padding keeps every real token's positions as in an unpadded run."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return PaddedBatch(input_ids, attention_mask)


@dataclass(frozen=True)
class DocumentActivations:
    """Residual-stream activations of one document's real tokens, aligned with its tokens and offsets."""

    index: int
    activations: torch.Tensor
    """`[n_tokens, d_model]` in the model's dtype."""
    token_ids: torch.Tensor
    offsets: torch.Tensor
    special_mask: torch.Tensor
    n_dropped: int = 0


def iter_document_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    layer: LayerSpec,
    *,
    batch_size: int = 8,
    max_tokens_per_batch: int = 8192,
    max_length: int = 1024,
    add_special_tokens: bool = True,
    stop_early: bool = True,
    out_device: str | torch.device = "cpu",
) -> Iterator[DocumentActivations]:
    """Stream documents through the model and yield each one's activations at `layer`, in input order.

    Memory stays bounded by `max_tokens_per_batch`; documents longer than `max_length` tokens are truncated
    (counted in `n_dropped` and logged). Pads never appear in what is yielded. The hook stays on the model
    until the iterator is exhausted or closed, so do not run the model elsewhere in between.
    """
    if max_length > max_tokens_per_batch:
        raise ValueError(f"max_length ({max_length}) must not exceed max_tokens_per_batch ({max_tokens_per_batch})")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # the value is never attended to by real tokens; any valid id will do
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    docs = (
        tokenize_document(tokenizer, text, i, max_length=max_length, add_special_tokens=add_special_tokens)
        for i, text in enumerate(texts)
    )
    n_truncated = 0
    with hook_residual_stream(model, layer, stop_early=stop_early) as hook:
        for batch in iter_token_batches(docs, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch):
            padded = pad_right([d.token_ids for d in batch], pad_id)
            acts = hook.forward(padded.input_ids, padded.attention_mask).to(out_device)
            for row, doc in enumerate(batch):
                if doc.n_dropped:
                    n_truncated += 1
                    logger.info(
                        "document %d truncated to %d tokens (%d dropped)",
                        doc.index,
                        max_length,
                        doc.n_dropped,
                    )
                yield DocumentActivations(
                    doc.index,
                    acts[row, : len(doc.token_ids)].clone(),
                    doc.token_ids,
                    doc.offsets,
                    doc.special_mask,
                    doc.n_dropped,
                )
    if n_truncated:
        logger.warning("%d documents were longer than max_length=%d tokens and were truncated", n_truncated, max_length)
