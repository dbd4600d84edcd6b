"""Loading policy: truncated loading is exact and cheaper, and every refused model gets an error naming it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from dfc.lm.hooks import LayerSpecError, capture_activations, find_decoder_layers
from tests.fixtures.tiny_models import TINY_ARCHS, TINY_CORPUS
from workers.activations import loading
from workers.activations.loading import ModelLoadError, load_model, needs_remote_code, truncate_config

ARCHS = list(TINY_ARCHS)


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(TINY_CORPUS[:3], padding=True, padding_side="right", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", ["middle", 1])
def test_truncated_loading_gives_the_same_activations_with_fewer_layers(
    tiny_models: Mapping[str, Path], arch: str, layer: int | str
) -> None:
    full = load_model(tiny_models[arch], device_map=None)
    cut = load_model(tiny_models[arch], device_map=None, up_to_layer=layer)
    assert cut.layer_index is not None and cut.truncated and not full.truncated
    assert cut.n_layers == full.n_layers == TINY_ARCHS[arch].n_layers
    assert cut.n_loaded_layers == len(find_decoder_layers(cut.model).layers) == cut.layer_index + 1
    assert _n_params(cut.model) < _n_params(full.model)
    layer_types = getattr(cut.config.get_text_config(), "layer_types", None)
    assert layer_types is None or len(layer_types) == cut.n_loaded_layers
    ids, mask = _batch(full.tokenizer)
    expected = capture_activations(full.model, ids, mask, cut.layer_index).activations
    got = capture_activations(cut.model, ids, mask, cut.layer_index).activations
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-6, rtol=1e-6)


def test_architectures_whose_layers_read_the_depth_are_loaded_whole(
    tiny_models: Mapping[str, Path], monkeypatch
) -> None:
    monkeypatch.setattr(loading, "_DEPTH_DEPENDENT_MODEL_TYPES", frozenset({"llama"}))
    loaded = load_model(tiny_models["llama"], up_to_layer=1)
    assert loaded.layer_index == 1 and not loaded.truncated and loaded.n_loaded_layers == 6


def test_a_truncation_that_leaves_weights_unloaded_falls_back_to_the_full_model(
    tiny_models: Mapping[str, Path], monkeypatch
) -> None:
    def truncate_and_break(config, n_keep):  # stands in for an architecture whose layers change shape
        changed = truncate_config(config, n_keep)
        config.attention_bias = True
        return changed

    monkeypatch.setattr(loading, "truncate_config", truncate_and_break)
    reference = load_model(tiny_models["llama"], device_map=None)
    loaded = load_model(tiny_models["llama"], device_map=None, up_to_layer=1)
    assert not loaded.truncated and not loaded.config.attention_bias
    ids, mask = _batch(reference.tokenizer)
    torch.testing.assert_close(
        capture_activations(loaded.model, ids, mask, 1).activations,
        capture_activations(reference.model, ids, mask, 1).activations,
    )


def test_loading_up_to_the_last_layer_loads_everything(tiny_models: Mapping[str, Path]) -> None:
    loaded = load_model(tiny_models["gpt2"], up_to_layer=-1)
    assert loaded.layer_index == 5 and not loaded.truncated and loaded.n_loaded_layers == 6


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_model_reports_its_width_depth_and_cpu_dtype(
    tiny_models: Mapping[str, Path], arch: str
) -> None:
    loaded = load_model(tiny_models[arch])
    assert loaded.hidden_size == TINY_ARCHS[arch].hidden_size
    assert loaded.n_layers == loaded.n_loaded_layers == TINY_ARCHS[arch].n_layers
    assert loaded.dtype == torch.float32 and next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.tokenizer.is_fast and not loaded.model.training


def test_bf16_loading_captures_bf16_activations_close_to_fp32(tiny_models: Mapping[str, Path]) -> None:
    fp32 = load_model(tiny_models["llama"], up_to_layer=2)
    bf16 = load_model(tiny_models["llama"], up_to_layer=2, dtype=torch.bfloat16)
    ids, mask = _batch(fp32.tokenizer)
    a32 = capture_activations(fp32.model, ids, mask, 2).activations
    a16 = capture_activations(bf16.model, ids, mask, 2).activations
    assert a16.dtype == torch.bfloat16
    torch.testing.assert_close(a16.float()[mask.bool()], a32[mask.bool()], atol=0.05, rtol=0.05)


def test_device_map_auto_with_a_cpu_memory_cap_still_captures_the_same_activations(
    tiny_models: Mapping[str, Path],
) -> None:
    plain = load_model(tiny_models["qwen3"], device_map=None)
    # A cap far below the model's size forces accelerate to offload weights; the capture must not change.
    capped = load_model(tiny_models["qwen3"], device_map="auto", max_memory={"cpu": 200_000})
    assert any(p.device.type == "meta" for p in capped.model.parameters())
    ids, mask = _batch(plain.tokenizer)
    torch.testing.assert_close(
        capture_activations(capped.model, ids, mask, -2).activations,
        capture_activations(plain.model, ids, mask, -2).activations,
    )


def test_a_bin_only_checkpoint_is_refused_without_unpickling(bin_only_model_dir: Path, monkeypatch) -> None:
    def no_unpickling(*_a, **_k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelLoadError, match=r"only pickled PyTorch weights \(\.bin\)") as err:
        load_model(bin_only_model_dir)
    assert str(bin_only_model_dir) in str(err.value) and "safetensors" in str(err.value)


def test_remote_code_is_refused_unless_allow_listed(remote_code_model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("DFC_TRUSTED_MODELS", "someone/else, another/model")
    expected = (
        f"model '{remote_code_model_dir}' needs trust_remote_code; add it to DFC_TRUSTED_MODELS to allow it"
    )
    with pytest.raises(ModelLoadError) as err:
        load_model(remote_code_model_dir)
    assert str(err.value) == expected
    with pytest.raises(ModelLoadError, match="needs trust_remote_code"):
        load_model(remote_code_model_dir, trusted_models=[])


def test_native_architectures_with_an_auto_map_do_not_need_remote_code() -> None:
    assert needs_remote_code({"model_type": "dfc_custom_arch", "auto_map": {"AutoConfig": "x.Y"}})
    assert not needs_remote_code({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}})
    assert not needs_remote_code({"model_type": "llama"})


def test_an_encoder_only_model_is_refused(encoder_only_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a decoder-only causal LM") as err:
        load_model(encoder_only_model_dir)
    assert str(encoder_only_model_dir) in str(err.value) and "BertForMaskedLM" in str(err.value)


def test_an_out_of_range_layer_is_refused_before_loading(tiny_models: Mapping[str, Path]) -> None:
    with pytest.raises(LayerSpecError, match="layer 99 is out of range: the model has 6 layers"):
        load_model(tiny_models["llama"], up_to_layer=99)


def test_a_missing_local_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(missing)
    assert str(missing) in str(err.value)


def test_an_unknown_hub_id_is_named_offline() -> None:
    with pytest.raises(ModelLoadError, match="'nobody-dfc-test/no-such-model'"):
        load_model("nobody-dfc-test/no-such-model", revision="v9")


def test_truncating_a_config_cuts_per_layer_lists_under_the_architectures_own_names(
    tiny_models: Mapping[str, Path],
) -> None:
    from transformers import AutoConfig

    gpt2 = AutoConfig.from_pretrained(tiny_models["gpt2"])
    assert truncate_config(gpt2, 2) == ["num_hidden_layers"] and gpt2.n_layer == 2
    gemma = AutoConfig.from_pretrained(tiny_models["gemma3"])
    assert truncate_config(gemma, 3) == ["num_hidden_layers", "layer_types"]
    assert gemma.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
