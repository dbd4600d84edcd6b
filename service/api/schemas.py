"""The API's own response bodies; requests are ``workers.spec.AuditSpec`` and records build on ``AuditStatus``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.pipeline.status import AuditStatus
from workers.spec import AuditSpec

AUDIT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
"""What an audit id may look like in a URL: safe as an object-key segment (no '/', never '..')."""


class ErrorBody(BaseModel):
    """Every error the API returns (except FastAPI's 422 validation list): what went wrong and what to do."""

    detail: str = Field(description="What went wrong.")
    hint: str | None = Field(None, description="What to do about it, when there is something to do.")


class AuditRecord(AuditStatus):
    """An audit as the API returns it: its status and the spec it was submitted with."""

    spec: AuditSpec = Field(description="The audit's parameters, exactly as submitted (defaults filled in).")

    @classmethod
    def of(cls, status: AuditStatus, spec: AuditSpec) -> AuditRecord:
        """Join a status and its spec."""
        return cls(**dict(status), spec=spec)


class AuditPage(BaseModel):
    """One page of audits, newest first."""

    model_config = ConfigDict(extra="forbid")
    items: list[AuditStatus] = Field(description="Audit statuses (without specs: GET /audits/{id} has those).")
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= to get the next page; null on the last page."
    )


class ReportLinks(BaseModel):
    """Presigned URLs from which a finished report can be fetched straight from the bucket."""

    json_url: str = Field(description="URL of report.json.")
    html_url: str | None = Field(None, description="URL of report.html, when it was published.")
    expires_in_s: int = Field(description="Seconds the URLs stay valid (local folders: forever).")


class Health(BaseModel):
    """The process answers."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Whether this instance can take audits, and why not."""

    ready: bool = Field(description="True when storage and the submitter both work.")
    checks: dict[str, str] = Field(description='Each dependency: "ok" or the reason it failed.')


def error_responses(*codes: int, by_reference: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the given error status codes, all with an ``ErrorBody``.

    ``by_reference`` spells the JSON content out, for routes whose own media type is not JSON (FastAPI
    would otherwise document their errors under that media type).
    """
    described = {
        400: "The body could not be read as JSON text (e.g. it is not UTF-8).",
        401: "Missing or wrong API key.",
        404: "No such audit.",
        409: "The audit is not in a state that allows this.",
        413: "Request body larger than DFC_MAX_BODY_BYTES.",
        503: "Object storage or Ray is unavailable; retry later.",
    }
    if by_reference:
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        return {code: {"description": described[code], "content": content} for code in codes}
    return {code: {"model": ErrorBody, "description": described[code]} for code in codes}
