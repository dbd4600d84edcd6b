"""What a screening pass (``dfc-audit screen``) reports: one result per model looked at, tallied into a summary.

The summary is written to the bucket (``screening/runs/{timestamp}-{run}.json`` and ``screening/latest.json``),
printed and logged by the CLI, and read back by the API's ``/metrics``. This module imports only pydantic and
the storage layer, so the API can read summaries without importing the Hub client.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from workers.storage import ObjectNotFound, ObjectStore

LATEST_KEY = "screening/latest.json"
RUNS_PREFIX = "screening/runs/"

Outcome = Literal["submitted", "skipped", "error"]
SkipReason = Literal[
    "private",
    "gated",
    "already_submitted",
    "in_progress",
    "not_found",
    "not_causal_lm",
    "no_safetensors",
    "too_large",
    "custom_code",
    "max_models",
    "dry_run",
]
"""Why a model was not submitted: a closed set, so metrics can label by it."""
ErrorReason = Literal["hub_error", "submit_failed"]
"""Why a model could not be handled this run (it is looked at again next run)."""
Reason = SkipReason | ErrorReason
SKIP_REASONS: tuple[str, ...] = get_args(SkipReason)
ERROR_REASONS: tuple[str, ...] = get_args(ErrorReason)


class ModelResult(BaseModel):
    """What happened to one model the run looked at."""

    model: str
    revision: str | None
    watch: str = Field(description="The watch-list entry that matched.")
    outcome: Outcome
    # A plain string when read back, so a summary written by a newer screener with a new reason still loads.
    reason: str | None = Field(None, description="Short code: not_causal_lm, too_large, gated, …")
    detail: str | None = Field(None, description="A sentence for people.")
    audit_id: str | None = None
    parameters: int | None = None


class ScreeningSummary(BaseModel):
    """A run's summary: written to the bucket, printed, and logged."""

    run_id: str
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    dry_run: bool = False
    counts: dict[str, int] = Field(default_factory=dict, description="seen, submitted, skipped, errors.")
    skipped_by_reason: dict[str, int] = Field(default_factory=dict)
    last_success_at: dt.datetime | None = Field(
        None, description="When the newest run without errors finished: this run, or as the previous summary said."
    )
    watermarks: dict[str, dict[str, str | None]] = Field(default_factory=dict, description="before/after.")
    models: list[ModelResult] = Field(default_factory=list)

    def tally(self) -> None:
        """Recompute the counts from ``models``."""
        outcomes = Counter(m.outcome for m in self.models)
        self.counts = {
            "seen": len(self.models),
            "submitted": outcomes["submitted"],
            "skipped": outcomes["skipped"],
            "errors": outcomes["error"],
        }
        self.skipped_by_reason = dict(Counter(m.reason or "" for m in self.models if m.outcome == "skipped"))

    @property
    def succeeded(self) -> bool:
        """Whether the run finished with no errors (skips are not errors)."""
        return self.finished_at is not None and all(m.outcome != "error" for m in self.models)


def latest_summary(store: ObjectStore) -> dict[str, Any] | None:
    """The last run's summary as stored (for metrics and status pages), or None before the first run."""
    try:
        return store.get_json(LATEST_KEY)
    except ObjectNotFound:
        return None


def read_latest(store: ObjectStore) -> ScreeningSummary | None:
    """The last run's summary, or None before the first run; raises StorageError or pydantic's ValidationError."""
    document = latest_summary(store)
    return None if document is None else ScreeningSummary.model_validate(document)


def write_summary(store: ObjectStore, summary: ScreeningSummary) -> str:
    """Store the summary as this run's record and as the latest; returns the run record's key."""
    stamp = summary.started_at.strftime("%Y%m%dT%H%M%SZ")
    key = f"{RUNS_PREFIX}{stamp}-{summary.run_id}.json"
    document = summary.model_dump(mode="json")
    store.put_json(key, document)
    store.put_json(LATEST_KEY, document)
    return key
