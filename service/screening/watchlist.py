"""The screening watch list: which Hub organisations or model-id patterns to watch, and what to audit them against.

A YAML or JSON file (the Kubernetes ConfigMap ``dfc-audit-watchlist`` holds one)::

    defaults:
      max_parameters: 16B        # skip larger models (from the Hub's safetensors metadata)
      initial_since: 7d          # with no watermark yet, look back this far (or an ISO date)
      spec: {token_budget: 20000000}
    watch:
      - pattern: "Qwen/Qwen3-*"                  # org/model-id glob; the org part is literal
        reference: "meta-llama/Llama-3.1-8B-Instruct"
      - org: "mistralai"                         # every model of an organisation
        reference: "Qwen/Qwen2.5-7B-Instruct@<commit-sha>"
        max_parameters: 8B
        spec: {steering: {enabled: false}}       # merged over defaults.spec
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from workers.spec import AuditSpec

_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_DURATION = re.compile(r"^(\d+)\s*([dhm])$")
_ORG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class WatchListError(ValueError):
    """The watch list file is missing, unparsable or invalid; the message names the file and the problem."""


def parse_count(value: Any) -> Any:
    """Accept parameter counts as numbers or with a K/M/B/T suffix ("16B", "1.5T")."""
    if isinstance(value, str):
        text = value.strip().upper()
        if text and text[-1] in _SUFFIXES:
            try:
                return int(float(text[:-1]) * _SUFFIXES[text[-1]])
            except ValueError:
                raise ValueError(f"parameter count {value!r} is not a number with a K/M/B/T suffix") from None
        return int(float(text))
    return value


ParameterCount = Annotated[int, BeforeValidator(parse_count), Field(gt=0)]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursing into nested mappings (lists and scalars are replaced)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchDefaults(_Strict):
    """Settings every entry inherits unless it sets its own."""

    max_parameters: ParameterCount = Field(
        16_000_000_000, description="Skip models with more parameters than this (safetensors metadata)."
    )
    initial_since: str = Field(
        "7d", description="First run (no watermark): look back this long (7d, 12h, 30m) or since an ISO date."
    )
    allow_gated: bool = Field(
        False, description="Also audit gated models (the workers' HF_TOKEN must have been granted access)."
    )
    max_models: int = Field(200, ge=1, le=10_000, description="Most models looked at per entry and run.")
    spec: dict[str, Any] = Field(default_factory=dict, description="AuditSpec fields for every audit.")

    def since(self, now: dt.datetime) -> dt.datetime:
        """The moment ``initial_since`` names, relative to ``now``."""
        match = _DURATION.match(self.initial_since.strip())
        if match:
            amount, unit = int(match[1]), match[2]
            unit_name = {"d": "days", "h": "hours", "m": "minutes"}[unit]
            return now - dt.timedelta(**{unit_name: amount})
        when = dt.datetime.fromisoformat(self.initial_since.strip().replace("Z", "+00:00"))
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

    @model_validator(mode="after")
    def _valid_since(self) -> WatchDefaults:
        try:
            self.since(dt.datetime.now(dt.UTC))
        except ValueError:
            raise ValueError(
                f"initial_since {self.initial_since!r} is neither a duration (7d, 12h, 30m) nor an ISO date"
            ) from None
        return self


class WatchEntry(_Strict):
    """One organisation or model-id pattern to watch, and the trusted model it is compared against."""

    org: str | None = Field(None, description="A Hub organisation or user: watch all its models.")
    pattern: str | None = Field(None, description="An org/model-id glob (fnmatch); the org part has no wildcard.")
    reference: str = Field(description="Trusted reference model: org/name, optionally @revision.", min_length=1)
    max_parameters: ParameterCount | None = Field(None, description="Overrides defaults.max_parameters.")
    allow_gated: bool | None = Field(None, description="Overrides defaults.allow_gated.")
    spec: dict[str, Any] = Field(default_factory=dict, description="AuditSpec fields merged over defaults.spec.")

    @model_validator(mode="after")
    def _one_selector(self) -> WatchEntry:
        if (self.org is None) == (self.pattern is None):
            raise ValueError("give exactly one of `org` or `pattern`")
        author = self.author
        # The Hub lists models per author; a wildcard there would mean scanning the whole Hub.
        if not _ORG.match(author):
            raise ValueError(f"{self.key!r}: the organisation part must be a literal Hub name, not a pattern")
        if self.pattern is not None and "/" not in self.pattern:
            raise ValueError(f"pattern {self.pattern!r} must look like org/model-glob, e.g. 'Qwen/Qwen3-*'")
        return self

    @property
    def key(self) -> str:
        """The entry's name in summaries and in the watermark (``org/*`` for an organisation)."""
        return self.pattern if self.pattern is not None else f"{self.org}/*"

    @property
    def author(self) -> str:
        """The Hub author whose models are listed."""
        return self.key.split("/", 1)[0]

    def reference_model(self) -> dict[str, str]:
        """The reference as an AuditSpec ``model_a`` fragment (id and revision)."""
        model_id, _, revision = self.reference.partition("@")
        return {"id": model_id, "revision": revision or "main"}


class WatchList(_Strict):
    """The whole watch list file."""

    defaults: WatchDefaults = Field(default_factory=WatchDefaults, description="Inherited by every entry.")
    watch: list[WatchEntry] = Field(description="What to watch.", min_length=1)

    @model_validator(mode="after")
    def _specs_valid(self) -> WatchList:
        # Fail when the file is read, not an hour later on the first new release.
        for entry in self.watch:
            try:
                self.audit_body(entry, "screening/placeholder", "0" * 40)
            except ValidationError as e:
                raise ValueError(f"entry {entry.key!r}: the merged spec is not a valid audit spec: {e}") from None
        return self

    def max_parameters(self, entry: WatchEntry) -> int:
        """The size limit for an entry."""
        return entry.max_parameters if entry.max_parameters is not None else self.defaults.max_parameters

    def allow_gated(self, entry: WatchEntry) -> bool:
        """Whether an entry audits gated models."""
        return entry.allow_gated if entry.allow_gated is not None else self.defaults.allow_gated

    def audit_body(self, entry: WatchEntry, model_id: str, revision: str) -> dict[str, Any]:
        """The POST /audits body for one new model: defaults, then the entry's spec, then the two models."""
        spec = deep_merge(self.defaults.spec, entry.spec)
        pinned = {
            "model_a": entry.reference_model(),
            "model_b": {"id": model_id, "revision": revision},
            "labels": {"source": "screening", "watch": entry.key},
        }
        body = deep_merge(spec, pinned)
        # Validated here so a bad override is reported as the watch list's fault, not the API's.
        AuditSpec.model_validate(body)
        return body


def load_watch_list(path: Path | str) -> WatchList:
    """Read and validate a watch list file (``.json``, or YAML for any other extension)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise WatchListError(f"cannot read the watch list {path}: {e.strerror or e}") from e
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise WatchListError(f"watch list {path} is not valid {kind}: {e}") from e
    if not isinstance(raw, dict):
        raise WatchListError(f"watch list {path} must be a mapping with a `watch:` list")
    try:
        return WatchList.model_validate(raw)
    except ValidationError as e:
        raise WatchListError(f"watch list {path} is invalid:\n{e}") from None
