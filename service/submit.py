"""Handing an audit to Ray: in the API process (embedded default) or to a cluster through the Ray Jobs API.

A submitter only starts work; everything about an audit (spec, status, cancellation, which API drives it) is
in the store, so any API instance can submit, poll or cancel any audit, and a restarted one finds the audits
whose driver is gone (service/orphans.py). Ray is imported lazily: an API that never submits (tests, a
read-only replica) never loads it. The two submitters live in service/local_ray.py and service/ray_jobs.py.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from service.drivers import DriverRecords
from service.settings import Settings
from workers.status import AuditStore
from workers.storage import open_store

if TYPE_CHECKING:
    from service.local_ray import LocalRaySubmitter
    from service.ray_jobs import JobClient, RayJobsSubmitter

__all__ = [
    "ENTRYPOINT",
    "PIPELINE",
    "JobClient",
    "LocalRaySubmitter",
    "RayJobsSubmitter",
    "SubmitError",
    "Submitter",
    "make_submitter",
]

log = logging.getLogger(__name__)

PIPELINE = "workers.pipeline:run_audit"
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


def make_submitter(settings: Settings, audits: AuditStore | None = None) -> Submitter:
    """The submitter DFC_RAY_ADDRESS asks for: Jobs API for http(s)://, local or joined Ray otherwise."""
    from service.local_ray import LocalRaySubmitter
    from service.ray_jobs import RayJobsSubmitter

    address = settings.ray_address.strip()
    if address.startswith(("http://", "https://")):
        return RayJobsSubmitter(settings, address, audits=audits)
    return LocalRaySubmitter(settings, address or None, audits=audits)


def __getattr__(name: str) -> Any:
    """The submitter classes, from their modules (which import this one)."""
    if name == "LocalRaySubmitter":
        from service import local_ray

        return local_ray.LocalRaySubmitter
    if name in ("RayJobsSubmitter", "JobClient"):
        from service import ray_jobs

        return getattr(ray_jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
