"""Serving a finished audit's report: the JSON, the HTML page, or presigned URLs to both in the bucket."""

from __future__ import annotations

from service.api.audits import AuditService
from service.api.errors import ApiError
from service.api.schemas import ReportLinks
from workers.pipeline.status import AuditState, AuditStatus
from workers.report import AuditReport, render_html
from workers.storage import ObjectNotFound


class ReportService:
    """Reads the report objects a succeeded audit's status points to."""

    def __init__(self, service: AuditService, url_expires_s: int) -> None:
        self.service, self.store, self.url_expires_s = service, service.audits.store, url_expires_s

    def published(self, audit_id: str) -> AuditStatus:
        """The status of a succeeded audit with a report, or a 409 that says why there is none (yet)."""
        status = self.service.status(audit_id)
        if status.state is AuditState.SUCCEEDED and status.report_json:
            return status
        if status.state is AuditState.FAILED:
            reason = status.error.message if status.error else "no error recorded"
            raise ApiError(
                409, f"audit {audit_id} failed ({reason}); it has no report", "fix the cause and submit it again"
            )
        if status.state is AuditState.CANCELLED:
            raise ApiError(409, f"audit {audit_id} was cancelled; it has no report", "submit it again")
        if status.state is AuditState.SUCCEEDED:
            raise ApiError(409, f"audit {audit_id} succeeded but recorded no report", "submit it again")
        raise ApiError(
            409,
            f"audit {audit_id} is {status.state.value} ({status.progress:.0%} done); "
            "its report exists once the audit has succeeded",
            f"poll GET /audits/{audit_id} until its state is succeeded",
        )

    def _read(self, audit_id: str, key: str) -> bytes:
        try:
            return self.store.get_bytes(key)
        except ObjectNotFound:
            raise ApiError(
                404,
                f"audit {audit_id} succeeded but its report object {key!r} is missing from the store",
                "the bucket may have been cleaned up; submit the audit again",
            ) from None

    def report(self, audit_id: str) -> AuditReport:
        """The parsed report.json."""
        status = self.published(audit_id)
        assert status.report_json is not None
        return AuditReport.model_validate_json(self._read(audit_id, status.report_json))

    def html(self, audit_id: str) -> str:
        """The published report.html, or one rendered from report.json when only that was published."""
        status = self.published(audit_id)
        if status.report_html:
            return self._read(audit_id, status.report_html).decode()
        return render_html(self.report(audit_id))

    def links(self, audit_id: str) -> ReportLinks:
        """Presigned URLs of the report objects."""
        status = self.published(audit_id)
        assert status.report_json is not None
        expires = self.url_expires_s
        html_url = self.store.presigned_url(status.report_html, expires) if status.report_html else None
        return ReportLinks(
            json_url=self.store.presigned_url(status.report_json, expires), html_url=html_url, expires_in_s=expires
        )
