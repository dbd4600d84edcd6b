"""What a stage function works with: the audit, its store, earlier stages' manifests, progress and cancellation.

Stage functions (``workers/pipeline/stages.py``, ``workers/analysis/analyse.py``) take a :class:`StageContext` and
return their
manifest; the driver (``workers/pipeline/run.py``) makes one context per run and is the only writer of status.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.pipeline.status import AuditState, AuditStatus, AuditStore, overall_progress
from workers.spec import AuditSpec
from workers.storage import ObjectStore

STATUS_INTERVAL_S = 1.0
"""status.json is rewritten at most this often while a stage reports progress."""


class AuditCancelled(Exception):  # noqa: N818 - names the outcome, as callers read it
    """Someone asked for the audit to stop (``cancel.json`` exists)."""


@dataclass
class StageContext:
    """What a stage function gets: the audit, its store, earlier stages' manifests, progress and cancellation."""

    audit_id: str
    spec: AuditSpec
    store: ObjectStore
    audits: AuditStore
    work_dir: Path
    """Local scratch space of this audit (not shared between nodes; storage is the truth)."""
    store_url: str = ""
    """Where workers reopen the store (with ``store_settings``): stores never travel through Ray."""
    store_settings: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Manifests of the stages finished so far, by stage name."""
    attempt: int = 1
    """How many times the pipeline has started on this audit (1 on the first run)."""
    stage: AuditState = AuditState.QUEUED
    """The running stage."""
    counters: dict[str, float] = field(default_factory=dict)
    """Counters shown in status.json (tokens_extracted_a, training_step, …)."""
    status_interval_s: float = STATUS_INTERVAL_S
    _fraction: float = field(default=0.0, init=False, repr=False)
    _written_at: float = field(default=float("-inf"), init=False, repr=False)

    def key(self, name: str) -> str:
        """The object key of ``name`` in this audit's folder (``audits/{id}/{name}``)."""
        return self.audits.key(self.audit_id, name)

    def report_progress(self, fraction: float, *, force: bool = False, **counters: float) -> None:
        """Record the stage's progress fraction and counters; status.json is rewritten at most once per
        ``status_interval_s`` unless ``force`` (the latest values are written by the next allowed write)."""
        self._fraction = min(1.0, max(0.0, float(fraction)))
        self.counters.update({name: float(value) for name, value in counters.items()})
        if force or time.monotonic() - self._written_at >= self.status_interval_s:
            self.write_status()

    def write_status(self, **changes: Any) -> AuditStatus:
        """Write the current stage, progress and counters, plus ``changes``, to status.json."""
        self._written_at = time.monotonic()
        return self.audits.update(
            self.audit_id,
            stage_progress=self._fraction,
            progress=overall_progress(self.stage, self._fraction),
            counters=dict(self.counters),
            **changes,
        )

    def check_cancelled(self) -> None:
        """Raise ``AuditCancelled`` if cancellation was requested; cheap enough to call every half second."""
        if self.audits.cancel_requested(self.audit_id):
            raise AuditCancelled(f"audit {self.audit_id} was cancelled during {self.stage.value}")

    def begin(self, state: AuditState) -> None:
        """Mark ``state`` as the running stage at 0%."""
        self.stage, self._fraction = state, 0.0
        self.write_status(state=state, stage=state)

    def end(self, seconds: float) -> None:
        """Mark the running stage done and record its wall time."""
        self._fraction = 1.0
        done = self.audits.status(self.audit_id).stage_seconds
        self.write_status(stage_seconds={**done, self.stage.value: seconds})


StageFn = Callable[[StageContext], dict[str, Any]]
"""A stage: does its work, writes its outputs to storage, returns its manifest (the driver writes that last)."""
