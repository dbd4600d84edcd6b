"""Residual-stream capture equals transformers' hidden states, stops early, cleans up and ignores padding."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.lm.hooks import (
    LayerSpecError,
    TokenizedDocument,
    capture_activations,
    find_decoder_layers,
    hook_residual_stream,
    iter_document_activations,
    iter_token_batches,
    resolve_layer,
)
from tests.fixtures.tiny_models import TINY_ARCHS, TINY_CORPUS

ARCHS = list(TINY_ARCHS)
TEXTS = [TINY_CORPUS[0], TINY_CORPUS[5], "Hi.", TINY_CORPUS[6], TINY_CORPUS[3] + " " + TINY_CORPUS[7]]


@pytest.fixture(scope="module")
def loaded(tiny_models: Mapping[str, Path]) -> dict[str, tuple[nn.Module, object]]:
    """Each tiny model (fp32, eval) with its tokenizer, loaded once for this module."""
    out = {}
    for arch in ARCHS:
        path = tiny_models[arch]
        out[arch] = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    return out


def _padded_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _final_norm(model: nn.Module) -> nn.Module:
    base = model.base_model
    return next(getattr(base, n) for n in ("norm", "ln_f", "final_layernorm") if hasattr(base, n))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 1, -2, "middle"])
def test_capture_equals_hidden_states_of_full_forward(loaded, arch: str, layer: int | str) -> None:
    model, tokenizer = loaded[arch]
    ids, mask = _padded_batch(tokenizer, TEXTS[:3])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    captured = capture_activations(model, ids, mask, layer)
    n_layers = len(hidden) - 1
    assert captured.layer == resolve_layer(layer, n_layers)
    real = mask.bool()
    expected = hidden[captured.layer + 1]
    torch.testing.assert_close(captured.activations[real], expected[real], atol=1e-5, rtol=1e-5)
    rows = captured.per_sequence()
    assert [len(r) for r in rows] == mask.sum(dim=1).tolist()
    torch.testing.assert_close(rows[-1], expected[-1, : len(rows[-1])], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_capture_is_the_residual_stream_before_the_final_norm(loaded, arch: str) -> None:
    model, tokenizer = loaded[arch]
    ids, mask = _padded_batch(tokenizer, TEXTS[:2])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        captured = capture_activations(model, ids, mask, -1).activations
        normed = _final_norm(model)(captured)
    real = mask.bool()
    # transformers puts the final norm's output in hidden_states[-1]; the capture stays pre-norm.
    assert not torch.allclose(captured[real], hidden[-1][real], atol=1e-3)
    torch.testing.assert_close(normed[real], hidden[-1][real], atol=1e-5, rtol=1e-5)


def _count_block_calls(model: nn.Module) -> tuple[list[int], list]:
    blocks = find_decoder_layers(model).layers
    calls = [0] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):

        def pre_hook(_m, _a, i=i):
            calls[i] += 1

        handles.append(block.register_forward_pre_hook(pre_hook))
    return calls, handles


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_never_runs_the_blocks_above_the_hooked_layer(loaded, arch: str) -> None:
    model, tokenizer = loaded[arch]
    ids, mask = _padded_batch(tokenizer, TEXTS[:2])
    calls, handles = _count_block_calls(model)
    try:
        capture_activations(model, ids, mask, 1)
        assert calls[:2] == [1, 1]
        assert calls[2:] == [0] * (len(calls) - 2)
        capture_activations(model, ids, mask, 1, stop_early=False)
        assert calls[2:] == [1] * (len(calls) - 2)
    finally:
        for h in handles:
            h.remove()


def _n_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hook_is_removed_when_the_body_of_the_context_raises(loaded) -> None:
    model, tokenizer = loaded["llama"]
    before = _n_forward_hooks(model)
    with pytest.raises(ValueError, match="boom"), hook_residual_stream(model, 2) as hook:
        assert _n_forward_hooks(model) == before + 1
        hook.forward(*_padded_batch(tokenizer, TEXTS[:1]))
        raise ValueError("boom")
    assert _n_forward_hooks(model) == before


def test_hook_is_removed_when_the_forward_pass_fails(loaded) -> None:
    model, _ = loaded["gpt2"]
    before = _n_forward_hooks(model)
    out_of_vocab = torch.full((1, 4), model.config.vocab_size + 10)
    with pytest.raises(IndexError):
        capture_activations(model, out_of_vocab, None, 3)
    assert _n_forward_hooks(model) == before


def test_captured_activations_can_feed_a_trained_module(loaded) -> None:
    model, tokenizer = loaded["qwen3"]
    acts = capture_activations(model, *_padded_batch(tokenizer, TEXTS[:1]), 1).activations
    probe = nn.Linear(acts.shape[-1], 1)
    probe(acts).sum().backward()  # fails if the capture produced inference-mode tensors
    assert probe.weight.grad is not None and not acts.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batches_give_the_same_per_token_activations_as_single_documents(loaded, arch: str) -> None:
    model, tokenizer = loaded[arch]
    batched = list(iter_document_activations(model, tokenizer, TEXTS, "middle", batch_size=4))
    single = list(iter_document_activations(model, tokenizer, TEXTS, "middle", batch_size=1))
    assert [d.index for d in batched] == list(range(len(TEXTS)))
    for b, s in zip(batched, single, strict=True):
        n_tokens = len(tokenizer(TEXTS[b.index])["input_ids"])
        assert b.activations.shape == (n_tokens, model.config.get_text_config().hidden_size)
        assert torch.equal(b.token_ids, s.token_ids)
        assert tokenizer.pad_token_id not in b.token_ids.tolist()
        # Batched matmuls sum in another order (GPT-OSS reached 1.05e-5 once); a leaked pad moves them far more.
        torch.testing.assert_close(b.activations, s.activations, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_special_mask_flags_bos_and_nothing_else(loaded, arch: str) -> None:
    model, tokenizer = loaded[arch]
    for doc in iter_document_activations(model, tokenizer, TEXTS[:2], 0):
        expected = torch.zeros(len(doc.token_ids), dtype=torch.bool)
        if TINY_ARCHS[arch].adds_bos:
            assert doc.token_ids[0] == tokenizer.bos_token_id
            expected[0] = True
        assert torch.equal(doc.special_mask, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_offsets_of_real_tokens_point_into_the_text(loaded, arch: str) -> None:
    model, tokenizer = loaded[arch]
    for doc in iter_document_activations(model, tokenizer, TEXTS, 0):
        text = TEXTS[doc.index]
        spans = doc.offsets[~doc.special_mask]
        assert (spans[:, 0] <= spans[:, 1]).all() and spans.max() <= len(text)
        assert (spans[1:, 0] >= spans[:-1, 0]).all()  # offsets never go backwards


def test_truncated_documents_keep_their_prefix_and_count_what_was_dropped(loaded) -> None:
    model, tokenizer = loaded["mistral"]
    full = next(iter_document_activations(model, tokenizer, [TEXTS[4]], 2))
    cut = next(iter_document_activations(model, tokenizer, [TEXTS[4]], 2, max_length=8))
    assert len(cut.token_ids) == 8 and cut.n_dropped == len(full.token_ids) - 8
    # Causal attention: truncating the tail cannot change the prefix's activations.
    torch.testing.assert_close(cut.activations, full.activations[:8], atol=1e-5, rtol=1e-4)


def _doc(index: int, n_tokens: int) -> TokenizedDocument:
    return TokenizedDocument(
        index,
        torch.zeros(n_tokens, dtype=torch.long),
        torch.zeros(n_tokens, 2),
        torch.zeros(n_tokens, dtype=torch.bool),
    )


def test_batches_respect_row_and_padded_token_budgets_and_keep_order() -> None:
    lengths = [5, 30, 2, 17, 17, 40, 1, 8, 33, 12]
    batches = list(
        iter_token_batches((_doc(i, n) for i, n in enumerate(lengths)), batch_size=3, max_tokens_per_batch=64)
    )
    assert [d.index for b in batches for d in b] == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert max(len(d.token_ids) for d in batch) * len(batch) <= 64


def test_max_length_above_the_token_budget_is_refused(loaded) -> None:
    model, tokenizer = loaded["llama"]
    with pytest.raises(ValueError, match="max_length"):
        next(iter_document_activations(model, tokenizer, TEXTS, 0, max_length=512, max_tokens_per_batch=256))


@pytest.mark.parametrize(("spec", "expected"), [(0, 0), (5, 5), (-1, 5), (-6, 0), ("middle", 3), ("-2", 4)])
def test_layer_specs_resolve_to_block_indices(spec: int | str, expected: int) -> None:
    assert resolve_layer(spec, 6) == expected


@pytest.mark.parametrize("spec", [6, -7, 100, "top", 1.5])
def test_bad_layer_specs_name_the_spec_and_the_layer_count(spec: object) -> None:
    with pytest.raises(LayerSpecError) as err:
        resolve_layer(spec, 6)  # type: ignore[arg-type]
    assert str(spec) in str(err.value)
    if isinstance(spec, int):
        assert "6 layers" in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_are_the_block_stack_not_an_expert_list(loaded, arch: str) -> None:
    model, _ = loaded[arch]
    found = find_decoder_layers(model)
    assert len(found.layers) == model.config.get_text_config().num_hidden_layers == TINY_ARCHS[arch].n_layers
    assert found.path in {"model.layers", "transformer.h"}


class _TupleBlock(nn.Module):
    """A block in the pre-transformers-5 style, returning `(hidden_states, extras)`."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x + self.proj(x), None


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(_TupleBlock(8) for _ in range(3))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask=None, use_cache=None) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)[0]
        return h


def test_blocks_returning_tuples_are_captured_like_blocks_returning_tensors() -> None:
    model = _TupleModel()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model.blocks[1](model.blocks[0](model.embed(ids))[0])[0]
    torch.testing.assert_close(capture_activations(model, ids, None, 1).activations, expected)
