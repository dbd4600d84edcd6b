"""The submitter interface: what hands an audit to Ray, in the API process or to a cluster's Ray Jobs API.

A submitter only starts work; everything about an audit (spec, status, cancellation, which API drives it) is
in the store, so any API instance can submit, poll or cancel any audit, and a restarted one finds the audits
whose driver is gone (`orphans.py`). Ray is imported lazily: an API that never submits (tests, a read-only
replica) never loads it. The two implementations (`local_ray.py`, `ray_jobs.py`) import this module;
`factory.py` picks one.
"""

from __future__ import annotations

import logging
import uuid
from typing import Protocol, runtime_checkable

from service.settings import Settings
from service.submission.drivers import DriverRecords
from workers.pipeline.status import AuditStore
from workers.storage import open_store

__all__ = ["ENTRYPOINT", "PIPELINE", "StoreBacked", "SubmitError", "Submitter"]

log = logging.getLogger(__name__)

PIPELINE = "workers.pipeline.run:run_audit"
"""The function that runs a whole audit: ``run_audit(audit_id, store_url, store_settings) -> AuditStatus``."""
ENTRYPOINT = "dfc-audit run-audit {audit_id}"
"""The Ray Jobs entrypoint: the CLI runs the same pipeline as a job driver on the cluster."""


class SubmitError(Exception):
    """Ray did not take the audit; the message says what to check."""


@runtime_checkable
class Submitter(Protocol):
    """Starts and stops audits on some Ray; the store holds everything else."""

    def submit(self, audit_id: str) -> None:
        """Start running the (already stored) audit; submitting the same id twice must not start it twice."""
        ...

    def stop(self, audit_id: str) -> None:
        """Best-effort stop after cancellation was recorded in the store (the pipeline also checks it)."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Whether audits can be submitted now, and a reason a person can read."""
        ...

    def close(self) -> None:
        """Release connections (called when the app shuts down)."""
        ...


class StoreBacked:
    """Base of the submitters: the store they record drivers in (the app's, or opened from the settings)."""

    def __init__(self, settings: Settings, audits: AuditStore | None) -> None:
        self.settings, self._audits = settings, audits
        self.session = uuid.uuid4().hex
        """This submitter's id in the driver records it writes."""

    @property
    def audits(self) -> AuditStore:
        if self._audits is None:
            self._audits = AuditStore(open_store(self.settings.store_url, **self.settings.store_settings()))
        return self._audits

    @property
    def records(self) -> DriverRecords:
        return DriverRecords(self.audits)
