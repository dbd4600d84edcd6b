"""An audit's record in object storage: its spec, its status (the API's source of truth) and cancellation.

Layout (DESIGN.md): ``audits/{id}/spec.json`` (immutable), ``audits/{id}/status.json`` (rewritten
as work proceeds), ``audits/{id}/cancel.json`` (present = cancellation requested). Every write is a
whole-object put, so a reader sees the previous status or the next one, never a mix.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.spec import AuditSpec
from workers.storage import ObjectNotFound, ObjectStore


class AuditState(StrEnum):
    """Where an audit is; the stages run in this order."""

    QUEUED = "queued"
    EXTRACTING = "extracting"
    ALIGNING = "aligning"
    TRAINING = "training"
    ANALYSING = "analysing"
    STEERING = "steering"
    SCANNING = "scanning"
    EXPLAINING = "explaining"
    PUBLISHING = "publishing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (AuditState.SUCCEEDED, AuditState.FAILED, AuditState.CANCELLED)


STAGES: tuple[AuditState, ...] = (
    AuditState.EXTRACTING,
    AuditState.ALIGNING,
    AuditState.TRAINING,
    AuditState.ANALYSING,
    AuditState.STEERING,
    AuditState.SCANNING,
    AuditState.EXPLAINING,
    AuditState.PUBLISHING,
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_audit_id() -> str:
    """Short, sortable by creation time, safe in URLs, object keys and Ray job ids."""
    return f"{now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


class AuditError(BaseModel):
    """A failure a person can act on."""

    model_config = ConfigDict(extra="forbid")
    stage: str | None = Field(None, description="Stage that failed.")
    type: str = Field(description="Exception class name.")
    message: str = Field(description="What went wrong and what to do about it.")


class AuditStatus(BaseModel):
    """The state of one audit, as stored in ``status.json`` and returned by ``GET /audits/{id}``."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="Audit id.")
    state: AuditState = Field(AuditState.QUEUED, description="Current state.")
    stage: AuditState | None = Field(None, description="Stage running or last run.")
    progress: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the whole audit done (rough).")
    stage_progress: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the current stage done.")
    counters: dict[str, float] = Field(default_factory=dict, description="tokens_extracted_a, training_step, ...")
    created_at: dt.datetime = Field(default_factory=now, description="When the audit was submitted.")
    updated_at: dt.datetime = Field(default_factory=now, description="Last status write.")
    started_at: dt.datetime | None = Field(None, description="When the first stage started.")
    finished_at: dt.datetime | None = Field(None, description="When it succeeded, failed or was cancelled.")
    stage_seconds: dict[str, float] = Field(default_factory=dict, description="Wall time of each finished stage.")
    error: AuditError | None = Field(None, description="Why it failed, when it failed.")
    report_json: str | None = Field(None, description="Object key of report.json once published.")
    report_html: str | None = Field(None, description="Object key of report.html once published.")
    idempotency_key: str | None = Field(None, description="Client-supplied key the audit was created under.")
    spec_fingerprint: str = Field(description="Hash of the spec (same spec, same audit).")
    attempts: int = Field(0, ge=0, description="How many times the pipeline has started on this audit.")


# Stage weights for the overall progress fraction (extraction and training dominate the wall time).
_WEIGHTS = {
    AuditState.EXTRACTING: 0.35,
    AuditState.ALIGNING: 0.05,
    AuditState.TRAINING: 0.37,
    AuditState.ANALYSING: 0.08,
    AuditState.STEERING: 0.07,
    AuditState.SCANNING: 0.05,
    AuditState.EXPLAINING: 0.01,
    AuditState.PUBLISHING: 0.02,
}


def overall_progress(stage: AuditState, stage_progress: float) -> float:
    """Fraction of the audit done when ``stage`` is ``stage_progress`` of the way through."""
    done = 0.0
    for s in STAGES:
        if s == stage:
            return min(1.0, done + _WEIGHTS[s] * max(0.0, min(1.0, stage_progress)))
        done += _WEIGHTS[s]
    return 1.0 if stage is AuditState.SUCCEEDED else done


class AuditStore:
    """Reads and writes audit records under ``audits/`` of an object store."""

    def __init__(self, store: ObjectStore, root: str = "audits") -> None:
        self.store, self.root = store, root.strip("/")

    def key(self, audit_id: str, name: str) -> str:
        return f"{self.root}/{audit_id}/{name}"

    def create(self, spec: AuditSpec, idempotency_key: str | None = None, audit_id: str | None = None) -> AuditStatus:
        """Write ``spec.json`` (immutable, conditional put) then the first ``status.json``."""
        audit_id = audit_id or new_audit_id()
        if not self.store.put_json(self.key(audit_id, "spec.json"), spec.model_dump(mode="json"), if_absent=True):
            raise FileExistsError(f"audit {audit_id} already exists")
        status = AuditStatus(id=audit_id, idempotency_key=idempotency_key, spec_fingerprint=spec.fingerprint())
        self.write_status(status)
        return status

    def spec(self, audit_id: str) -> AuditSpec:
        return AuditSpec.model_validate(self.store.get_json(self.key(audit_id, "spec.json")))

    def status(self, audit_id: str) -> AuditStatus:
        try:
            return AuditStatus.model_validate(self.store.get_json(self.key(audit_id, "status.json")))
        except ObjectNotFound:
            raise KeyError(f"no audit {audit_id!r}") from None

    def exists(self, audit_id: str) -> bool:
        return self.store.exists(self.key(audit_id, "status.json"))

    def write_status(self, status: AuditStatus) -> AuditStatus:
        status = status.model_copy(update={"updated_at": now()})
        self.store.put_json(self.key(status.id, "status.json"), status.model_dump(mode="json"))
        return status

    def update(self, audit_id: str, **changes: Any) -> AuditStatus:
        """Read-modify-write of the status (one writer per audit: the pipeline driver)."""
        return self.write_status(self.status(audit_id).model_copy(update=changes))

    def request_cancel(self, audit_id: str) -> None:
        self.store.put_json(self.key(audit_id, "cancel.json"), {"requested_at": now().isoformat()})

    def cancel_requested(self, audit_id: str) -> bool:
        return self.store.exists(self.key(audit_id, "cancel.json"))

    def ids(self) -> Iterator[str]:
        """Every audit id, newest first (ids sort by creation time)."""
        seen = {key.split("/")[1] for key in self.store.list(f"{self.root}/") if key.endswith("/status.json")}
        yield from sorted(seen, reverse=True)
