"""Probes and metrics for the platform: ``/healthz``, ``/readyz``, ``/metrics`` (no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """The process is alive and answering (checks nothing else, so a store outage never restarts it)."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={503: {"model": Readiness, "description": "Storage or the submitter is not usable."}},
)
def readyz(request: Request, response: Response) -> Readiness:
    """Whether the object store answers and the submitter can reach Ray; 503 with the reasons if not."""
    checks: dict[str, str] = {}
    try:
        request.app.state.store.check()
        checks["storage"] = "ok"
    except Exception as e:  # any failure means not ready; the probe itself must never fail
        checks["storage"] = f"{type(e).__name__}: {e}"
    try:
        ok, reason = request.app.state.submitter.ready()
    except Exception as e:
        ok, reason = False, f"{type(e).__name__}: {e}"
    checks["submitter"] = "ok" if ok else reason
    ready = all(value == "ok" for value in checks.values())
    response.status_code = 200 if ready else 503
    return Readiness(ready=ready, checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {}}}},
)
def metrics(request: Request) -> Response:
    """Request, audit, stage, token and training-step metrics (METRICS.md explains each)."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
