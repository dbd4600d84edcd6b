"""Loading policy for the models an audit extracts from: safetensors only, remote code only when allow-listed,
decoder-only causal LMs only, and only the layers up to the hooked one when the architecture allows it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
)
from transformers.utils import logging as hf_logging

from dfc.lm.hooks import LayerSpec, find_decoder_layers, resolve_layer

logger = logging.getLogger(__name__)

TRUSTED_MODELS_ENV = "DFC_TRUSTED_MODELS"
"""Comma-separated model ids whose custom modelling code (`trust_remote_code`) may run."""

# Head classes that make a checkpoint a causal LM even when the auto mapping names another class for its type.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Their layers read the total depth (depth-scaled residuals, per-layer decay schedules, a bias on the last
# layer only), so a shorter config would change the kept layers: always load them whole.
_DEPTH_DEPENDENT_MODEL_TYPES = frozenset({"minicpm3", "minimax", "gpt_neox_japanese"})


class ModelLoadError(RuntimeError):
    """A model that cannot or must not be loaded; the message names it and says what to do."""


@dataclass
class LoadedModel:
    """A causal LM ready for activation capture, with what was loaded and how."""

    model: torch.nn.Module
    tokenizer: Any
    config: PretrainedConfig
    """The config the model was built from (after truncation, if any)."""
    model_id: str
    revision: str | None
    n_layers: int
    """Decoder blocks of the full model, as published."""
    n_loaded_layers: int
    """Decoder blocks actually instantiated and loaded (fewer than `n_layers` when truncated)."""
    hidden_size: int
    layer_index: int | None
    """Resolved `up_to_layer` (non-negative), or None when every layer was loaded."""
    dtype: torch.dtype
    trust_remote_code: bool

    @property
    def truncated(self) -> bool:
        """Whether upper layers were left out; such a model is for extraction only (its logits are void)."""
        return self.n_loaded_layers < self.n_layers


def trusted_models_from_env() -> set[str]:
    """The allow-list of `DFC_TRUSTED_MODELS`."""
    return {m.strip() for m in os.environ.get(TRUSTED_MODELS_ENV, "").split(",") if m.strip()}


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators is meant as a local folder.
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def _load_error(name: str, revision: str | None, exc: BaseException, doing: str) -> ModelLoadError:
    """Map a failure while `doing` something to an error naming the model: hub errors get specific advice."""
    return _hub_error(name, revision, exc) or ModelLoadError(f"cannot {doing} of model '{name}': {exc}")


def _hub_error(name: str, revision: str | None, exc: BaseException) -> ModelLoadError | None:
    """Map a hub failure (usually wrapped in an OSError by transformers) to an error naming what was asked."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, GatedRepoError):
            return ModelLoadError(
                f"model '{name}' is gated: accept its licence on huggingface.co and pass a "
                f"token (HF_TOKEN) that has access"
            )
        if isinstance(cause, RepositoryNotFoundError):
            return ModelLoadError(
                f"model '{name}' not found: it is neither a local folder nor a Hugging Face "
                f"repository (check the id; a private repo needs a token)"
            )
        if isinstance(cause, RevisionNotFoundError):
            return ModelLoadError(
                f"revision '{revision}' of model '{name}' not found: use an existing branch, tag or commit"
            )
        if isinstance(cause, LocalEntryNotFoundError):
            return ModelLoadError(
                f"model '{name}' (revision {revision or 'main'}) is not in the local cache and "
                f"the hub cannot be reached (offline?): download it first or fix the network"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def _read_config_dict(name: str, revision: str | None, token: str | None) -> dict[str, Any]:
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"model path '{name}' does not exist or is not a folder")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name, revision=revision, token=token)
    except OSError as exc:
        raise _load_error(name, revision, exc, "read the config") from exc
    return config_dict


def needs_remote_code(config_dict: Mapping[str, Any]) -> bool:
    """Whether the checkpoint's architecture exists only as custom code shipped with it (`auto_map`)."""
    return "auto_map" in config_dict and config_dict.get("model_type") not in CONFIG_MAPPING


def check_causal_lm(name: str, config: PretrainedConfig) -> None:
    """Refuse encoder-only, encoder-decoder and other non-causal checkpoints, naming what they are."""
    archs = list(getattr(config, "architectures", None) or [])
    what = f"model '{name}' ({', '.join(archs) or config.model_type})"
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{what} is an encoder-decoder model; an audit needs a decoder-only causal LM")
    if getattr(config, "auto_map", None) and "AutoModelForCausalLM" in config.auto_map:
        return
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"{what} is not a decoder-only causal LM (no causal-LM class for model type "
            f"'{config.model_type}'); an audit needs one"
        )
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and not any(a in causal_names or a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise ModelLoadError(
            f"{what} is not a decoder-only causal LM (an encoder-only or task-head checkpoint); "
            f"an audit needs a causal LM"
        )


def _check_safetensors(name: str) -> None:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return  # hub ids are checked by from_pretrained(use_safetensors=True); its error is mapped below
    files = [f.name for f in folder.iterdir()]
    pickled = any(f.endswith(_PICKLE_SUFFIXES) for f in files)
    if pickled and not any(f.endswith(".safetensors") for f in files):
        raise _bin_only_error(name)


def _bin_only_error(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"model '{name}' has only pickled PyTorch weights (.bin), which are never unpickled here because "
        f"unpickling can run arbitrary code: use a revision that ships .safetensors (many hub repos have a "
        f"safetensors conversion PR, e.g. revision='refs/pr/N'), or convert it once in a sandbox with "
        f"save_pretrained(..., safe_serialization=True)"
    )


def layer_count_attribute(config: PretrainedConfig) -> PretrainedConfig | None:
    """The (text) config that carries `num_hidden_layers`, or None if the architecture does not expose it."""
    text_config = config.get_text_config()
    return text_config if isinstance(getattr(text_config, "num_hidden_layers", None), int) else None


def can_truncate(config: PretrainedConfig, trust_remote_code: bool) -> bool:
    """Whether loading fewer layers leaves the kept layers computing exactly what they do in the full model.

    Custom code is unknown territory, and a few native architectures read the depth inside every layer.
    """
    if trust_remote_code or layer_count_attribute(config) is None:
        return False
    return config.get_text_config().model_type not in _DEPTH_DEPENDENT_MODEL_TYPES


def truncate_config(config: PretrainedConfig, n_keep: int) -> list[str]:
    """Set the layer count to `n_keep` and cut every per-layer list (`layer_types`, …); return what changed.

    `num_hidden_layers` reaches the architecture's own name (`n_layer`, …) through `attribute_map`.
    """
    text_config = layer_count_attribute(config)
    if text_config is None:
        return []
    n_full = text_config.num_hidden_layers
    changed = []
    for key, value in text_config.to_dict().items():
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n_full:
            setattr(text_config, key, type(value)(value[:n_keep]))
            changed.append(key)
    text_config.num_hidden_layers = n_keep
    return ["num_hidden_layers", *changed]


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report, which lists every deliberately skipped upper-layer weight."""
    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-weight progress bars only clutter worker logs
    # Auto-conversion would silently load a bot-made safetensors PR instead of the pinned revision.
    old_env = os.environ.get("DISABLE_SAFETENSORS_CONVERSION")
    os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("DISABLE_SAFETENSORS_CONVERSION", None)
        else:
            os.environ["DISABLE_SAFETENSORS_CONVERSION"] = old_env


def load_model(
    model_id_or_path: str | Path,
    *,
    revision: str | None = None,
    device_map: str | dict[str, Any] | None = "auto",
    max_memory: dict[Any, str | int] | None = None,
    dtype: torch.dtype | None = None,
    trusted_models: Iterable[str] | None = None,
    up_to_layer: LayerSpec | None = None,
    token: str | None = None,
) -> LoadedModel:
    """Load a decoder-only causal LM and its tokenizer under the audit's loading policy.

    `up_to_layer` (index, negative index or "middle", resolved against the full model) loads only blocks
    0..L where the architecture allows it. `trusted_models` defaults to `DFC_TRUSTED_MODELS`. With
    `device_map` set but accelerate missing, the model is loaded on CPU without a device map.
    """
    name = str(model_id_or_path)
    trusted = set(trusted_models) if trusted_models is not None else trusted_models_from_env()
    config_dict = _read_config_dict(name, revision, token)
    trust_remote_code = name in trusted
    if needs_remote_code(config_dict) and not trust_remote_code:
        raise ModelLoadError(
            f"model '{name}' needs trust_remote_code; add it to {TRUSTED_MODELS_ENV} to allow it"
        )
    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, token=token, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_error(name, revision, exc, "read the config") from exc
    check_causal_lm(name, config)
    _check_safetensors(name)

    counted = layer_count_attribute(config)
    n_layers = counted.num_hidden_layers if counted is not None else None
    layer_index = None
    full_config, truncating = copy.deepcopy(config), False
    if up_to_layer is not None and n_layers is not None:
        layer_index = resolve_layer(up_to_layer, n_layers)
        if layer_index + 1 < n_layers and can_truncate(config, trust_remote_code):
            changed, truncating = truncate_config(config, layer_index + 1), True
            logger.info(
                "loading layers 0..%d of %d of '%s' (config: %s)",
                layer_index,
                n_layers,
                name,
                ", ".join(changed),
            )

    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        logger.warning("accelerate is not installed: loading '%s' without a device map", name)
        device_map, max_memory = None, None
    load = dict(
        revision=revision,
        token=token,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        trust_remote_code=trust_remote_code,
    )
    # Mismatched shapes after truncation must reach the fallback below, not abort the load.
    model, info = _from_pretrained(name, config, ignore_mismatched_sizes=truncating, **load)
    if truncating and (info.get("missing_keys") or info.get("mismatched_keys")):
        # A shorter config changed the shape of the kept layers: their weights would be random, not loaded.
        logger.warning("'%s': truncated loading left weights unloaded; loading all layers instead", name)
        config = full_config
        model, info = _from_pretrained(name, config, **load)
    model.eval()
    _report_loading(name, info, layer_index)

    layers = find_decoder_layers(model)
    if n_layers is None:  # architecture hides its depth in the config: count the blocks
        n_layers = len(layers.layers)
        if up_to_layer is not None:
            layer_index = resolve_layer(up_to_layer, n_layers)
    text_config = config.get_text_config()
    loaded = LoadedModel(
        model=model,
        tokenizer=_load_tokenizer(name, revision, token, trust_remote_code),
        config=config,
        model_id=name,
        revision=revision,
        n_layers=n_layers,
        n_loaded_layers=len(layers.layers),
        hidden_size=int(text_config.hidden_size),
        layer_index=layer_index,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded '%s'%s: %d/%d layers (%s), d_model=%d, %.1fM parameters, %s, device map %s",
        name,
        f"@{revision}" if revision else "",
        loaded.n_loaded_layers,
        n_layers,
        layers.path,
        loaded.hidden_size,
        n_params / 1e6,
        dtype,
        getattr(model, "hf_device_map", None) or "none",
    )
    return loaded


def _from_pretrained(name: str, config: PretrainedConfig, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """`AutoModelForCausalLM.from_pretrained`, safetensors only, with errors that name the model."""
    try:
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(
                name, config=config, use_safetensors=True, output_loading_info=True, **kwargs
            )
    except OSError as exc:
        if "safetensors" in str(exc):
            raise _bin_only_error(name) from exc
        raise _load_error(name, kwargs.get("revision"), exc, "load the weights") from exc


def _report_loading(name: str, info: Mapping[str, Any], layer_index: int | None) -> None:
    """Log skipped upper-layer weights briefly; warn about anything else transformers had to say."""
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    above = {
        k
        for k in unexpected
        if layer_index is not None and (n := _layer_of(k)) is not None and n > layer_index
    }
    if above:
        logger.info("'%s': skipped %d weights of layers above %d", name, len(above), layer_index)
    others = [k for k in unexpected if k not in above]
    if others:
        logger.warning("'%s': %d checkpoint weights were not used, e.g. %s", name, len(others), others[:3])
    if missing:
        logger.warning(
            "'%s': %d weights missing from the checkpoint were randomly initialised, e.g. %s",
            name,
            len(missing),
            missing[:3],
        )


_LAYER_NUMBER = re.compile(r"\.(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")


def _layer_of(key: str) -> int | None:
    match = _LAYER_NUMBER.search(key)
    return int(match.group(1)) if match else None


def _load_tokenizer(name: str, revision: str | None, token: str | None, trust_remote_code: bool) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, token=token, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_error(name, revision, exc, "load the tokenizer") from exc
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("'%s' has a slow tokenizer: character offsets are unavailable", name)
    return tokenizer
