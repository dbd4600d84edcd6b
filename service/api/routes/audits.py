"""``/audits``: submit, read, list and cancel audits (every route needs an API key)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Response

from service.api.auth import require_api_key
from service.api.policy import explainer_refusals, local_path_refusals
from service.api.routes.deps import Audits, Config, invalid
from service.api.schemas import AUDIT_ID_PATTERN, AuditPage, AuditRecord, error_responses
from workers.pipeline.status import AuditState
from workers.spec import AuditSpec

router = APIRouter(prefix="/audits", tags=["audits"], dependencies=[Depends(require_api_key)])

AuditId = Annotated[str, Path(pattern=AUDIT_ID_PATTERN, description="Audit id, as returned by POST /audits.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r"^[\x21-\x7e]{1,255}$",
        description="Any unique string (e.g. a UUID): retrying a POST with it never starts a second audit.",
    ),
]
SPEC_EXAMPLES: dict[str, Any] = {
    "paper-pair": {
        "summary": "Qwen3-8B audited against Llama-3.1-8B-Instruct (paper defaults)",
        "value": {"model_a": {"id": "meta-llama/Llama-3.1-8B-Instruct"}, "model_b": {"id": "Qwen/Qwen3-8B"}},
    },
    "small-run": {
        "summary": "A cheap first look: fewer tokens, fewer reported features, pinned revision",
        "value": {
            "model_a": {"id": "meta-llama/Llama-3.2-1B-Instruct", "layer": 8},
            "model_b": {"id": "Qwen/Qwen3-1.7B", "revision": "main", "layer": "middle"},
            "token_budget": 500000,
            "top_features": 20,
            "steering": {"enabled": False},
            "labels": {"requested_by": "screening"},
        },
    },
}


def _location(response: Response, audit_id: str) -> None:
    response.headers["Location"] = f"/audits/{audit_id}"


@router.post(
    "",
    status_code=202,
    response_model=AuditRecord,
    summary="Submit an audit",
    responses={
        200: {"model": AuditRecord, "description": "The request names an existing audit; it is returned."},
        202: {"description": "A new audit was created and handed to Ray.", "headers": {"Location": {}}},
        **error_responses(400, 401, 409, 413, 503),
    },
)
def submit_audit(
    spec: Annotated[AuditSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    response: Response,
    service: Audits,
    config: Config,
    idempotency_key: IdempotencyKey = None,
) -> AuditRecord:
    """Create an audit of ``model_b`` against ``model_a`` and start it.

    Idempotent: with an ``Idempotency-Key`` the key always means the same audit; without one, the same
    spec returns the audit of it that has not finished yet. Either way no second run starts.
    """
    refusals = [] if config.allow_local_paths else local_path_refusals(spec)
    refusals += explainer_refusals(spec, config.explainer)
    if refusals:
        raise invalid(refusals[0].loc, refusals[0].message, refusals[0].value)
    submission = service.submit(spec, idempotency_key)
    response.status_code = 202 if submission.created else 200
    _location(response, submission.record.id)
    return submission.record


@router.get("", response_model=AuditPage, summary="List audits", responses=error_responses(401, 503))
def list_audits(
    service: Audits,
    config: Config,
    state: Annotated[AuditState | None, Query(description="Only audits in this state.")] = None,
    limit: Annotated[int | None, Query(ge=1, description="Page size (at most DFC_PAGE_SIZE_MAX).")] = None,
    cursor: Annotated[
        str | None, Query(pattern=AUDIT_ID_PATTERN, description="next_cursor of the previous page.")
    ] = None,
) -> AuditPage:
    """Audits newest first, optionally only those in one state, a page at a time."""
    if limit is not None and limit > config.page_size_max:
        raise invalid(("query", "limit"), f"limit must be at most {config.page_size_max}", limit)
    return service.page(state, limit or config.page_size_default, cursor)


@router.get(
    "/{audit_id}", response_model=AuditRecord, summary="Get an audit", responses=error_responses(401, 404, 503)
)
def get_audit(audit_id: AuditId, service: Audits) -> AuditRecord:
    """State, stage, progress, timings, error and report location of one audit, with its spec."""
    return service.get(audit_id)


@router.delete(
    "/{audit_id}",
    status_code=202,
    response_model=AuditRecord,
    summary="Cancel an audit",
    responses={
        200: {"model": AuditRecord, "description": "The audit was already cancelled."},
        202: {"description": "Cancellation requested; the pipeline stops at its next check."},
        **error_responses(401, 404, 409, 503),
    },
)
def cancel_audit(audit_id: AuditId, response: Response, service: Audits) -> AuditRecord:
    """Ask the audit to stop. One that no worker has started yet is cancelled at once."""
    cancellation = service.cancel(audit_id)
    response.status_code = 202 if cancellation.requested else 200
    _location(response, audit_id)
    return cancellation.record
