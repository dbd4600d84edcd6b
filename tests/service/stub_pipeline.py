"""A stand-in for ``workers.pipeline.run.run_audit`` that a real Ray worker runs in the submitter tests."""

from __future__ import annotations

import os
from typing import Any

from workers.pipeline.status import AuditState, AuditStatus, AuditStore, now
from workers.storage import open_store


def run_audit(audit_id: str, store_url: str, store_settings: dict[str, Any]) -> AuditStatus:
    """Record what the worker was given (its environment included), then finish the audit."""
    records = AuditStore(open_store(store_url, **store_settings))
    seen = {"pid": os.getpid(), "env_store_url": os.environ.get("DFC_STORE_URL")}
    records.store.put_json(records.key(audit_id, "stub-run.json"), seen)
    return records.update(audit_id, state=AuditState.SUCCEEDED, attempts=1, progress=1.0, finished_at=now())


def crash_worker(audit_id: str, store_url: str, store_settings: dict[str, Any]) -> AuditStatus:
    """Die the way an OOM-killed worker does: no exception, no final status."""
    os._exit(1)
