"""Dependencies the routers share: the per-app services, and request-validation errors in FastAPI's shape."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from service.api.audits import AuditService
from service.api.reports import ReportService
from service.settings import Settings


def audit_service(request: Request) -> AuditService:
    """The app's audit service."""
    return request.app.state.audit_service


def report_service(request: Request) -> ReportService:
    """The app's report service."""
    return request.app.state.report_service


def settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


Audits = Annotated[AuditService, Depends(audit_service)]
Reports = Annotated[ReportService, Depends(report_service)]
Config = Annotated[Settings, Depends(settings)]


def invalid(loc: tuple[str | int, ...], message: str, value: Any) -> RequestValidationError:
    """A 422 naming the offending field, in the same shape as FastAPI's own validation errors."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])
