"""The one place that picks a submitter for the settings, so the interface never imports its implementations."""

from __future__ import annotations

from service.settings import Settings
from service.submission.base import Submitter
from workers.pipeline.status import AuditStore


def make_submitter(settings: Settings, audits: AuditStore | None = None) -> Submitter:
    """The submitter DFC_RAY_ADDRESS asks for: Jobs API for http(s)://, local or joined Ray otherwise."""
    address = settings.ray_address.strip()
    if address.startswith(("http://", "https://")):
        from service.submission.ray_jobs import RayJobsSubmitter

        return RayJobsSubmitter(settings, address, audits=audits)
    from service.submission.local_ray import LocalRaySubmitter

    return LocalRaySubmitter(settings, address or None, audits=audits)
