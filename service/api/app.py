"""The FastAPI application: ``create_app(settings)`` wires the store, the submitter, auth, metrics and routers.

The process is stateless (every audit lives in the store) and light: it imports the spec, status,
storage and report-schema modules of ``workers`` and never torch; Ray only when it first submits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.audits import AuditService
from service.api.auth import ApiKeys
from service.api.errors import install_error_handlers
from service.api.metrics import ServiceMetrics
from service.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from service.api.reports import ReportService
from service.api.routes import audits, ops, reports
from service.settings import Settings
from service.submission.base import Submitter
from service.submission.factory import make_submitter
from service.submission.orphans import OrphanWatch, Reconciler
from workers.pipeline.status import AuditStore
from workers.storage import open_store

log = logging.getLogger(__name__)

DESCRIPTION = """Audits a new LLM against a trusted one with a Dedicated Feature Crosscoder: submit two model
ids, poll the audit, fetch a ranked report of the features exclusive to each model, with evidence."""


def create_app(settings: Settings | None = None, submitter: Submitter | None = None) -> FastAPI:
    """A new app on the store ``settings`` names; ``submitter`` defaults to the one DFC_RAY_ADDRESS asks for."""
    settings = settings or Settings()
    settings.apply_log_level()
    store = open_store(settings.store_url, **settings.store_settings())
    records = AuditStore(store)
    submitter = submitter or make_submitter(settings, records)
    metrics = ServiceMetrics(records, cache_s=settings.metrics_cache_s)
    service = AuditService(
        records,
        submitter,
        on_created=lambda status: metrics.submitted.inc(),
        on_cancel_requested=lambda status: metrics.cancel_requests.inc(),
    )
    if settings.auth_disabled:
        log.warning("API keys are disabled (DFC_AUTH_DISABLED=true): anyone who can reach this API can use it")

    # Audits whose driver died (a crashed API's embedded Ray, a failed Ray job) are found in the background
    # once the app starts, so a slow store or Ray start never delays serving.
    watch: OrphanWatch | None = None
    if settings.resume_orphans and isinstance(submitter, Reconciler):
        watch = OrphanWatch(records, submitter, interval_s=settings.orphan_check_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if watch is not None:
            watch.start()
        yield
        if watch is not None:
            watch.close()
        submitter.close()

    app = FastAPI(title="dfc-audit", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.submitter = submitter
    app.state.orphan_watch = watch
    app.state.metrics = metrics
    app.state.api_keys = ApiKeys(settings.api_key_list(), disabled=settings.auth_disabled)
    app.state.audit_service = service
    app.state.report_service = ReportService(service, settings.presigned_url_expires_s)
    routers = (audits.router, reports.router, ops.router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    # Added last = outermost: the metrics see the limit's 413s as well as every routed answer.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, routes=[r for rt in routers for r in rt.routes])
    return app
