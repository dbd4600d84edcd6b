"""``/audits/{id}/report…``: a succeeded audit's report as JSON, as an HTML page, or as bucket URLs."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from service.api.auth import require_api_key
from service.api.routes.audits import AuditId
from service.api.routes.deps import Reports
from service.api.schemas import ReportLinks, error_responses
from workers.report import AuditReport

router = APIRouter(prefix="/audits", tags=["reports"], dependencies=[Depends(require_api_key)])
ERRORS = error_responses(401, 404, 409, 503)


@router.get("/{audit_id}/report", response_model=AuditReport, summary="Get the report (JSON)", responses=ERRORS)
def get_report(audit_id: AuditId, reports: Reports) -> AuditReport:
    """The ranked features exclusive to each model with their evidence; 409 until the audit has succeeded."""
    return reports.report(audit_id)


@router.get(
    "/{audit_id}/report.html",
    response_class=HTMLResponse,
    summary="Get the report (HTML page)",
    responses={
        200: {"description": "A self-contained HTML page.", "content": {"text/html": {}}},
        **error_responses(401, 404, 409, 503, by_reference=True),
    },
)
def get_report_html(audit_id: AuditId, reports: Reports) -> HTMLResponse:
    """The self-contained report page for people; 409 until the audit has succeeded."""
    return HTMLResponse(reports.html(audit_id))


@router.get(
    "/{audit_id}/report/url", response_model=ReportLinks, summary="Get presigned report URLs", responses=ERRORS
)
def get_report_urls(audit_id: AuditId, reports: Reports) -> ReportLinks:
    """URLs to fetch the report straight from the bucket without credentials, until they expire."""
    return reports.links(audit_id)
