"""Errors the routes raise and the handlers that turn every failure into an ``ErrorBody`` with a fitting status.

Storage and Ray failures become 503 (the request was fine; a dependency is down), never 500, and a bad
key from a client never reaches the store as a 500 either. A validation error echoes the client's input, which
may hold numbers JSON cannot carry (NaN, 1e400): they are echoed as strings, so the 422 is always sent.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import ErrorBody
from service.submission.base import SubmitError
from workers.storage import InvalidKeyError, ObjectNotFound, StorageError

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"


class ApiError(Exception):
    """An error with its HTTP status, raised at the boundary where the request went wrong."""

    def __init__(
        self, status_code: int, detail: str, hint: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code, self.detail, self.hint, self.headers = status_code, detail, hint, headers


def error_response(status_code: int, detail: str, hint: str | None = None, **headers: str) -> JSONResponse:
    """A JSON ``ErrorBody`` response."""
    body = ErrorBody(detail=detail, hint=hint).model_dump(mode="json")
    return JSONResponse(body, status_code=status_code, headers=headers or None)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by its JSON-ish name ("NaN", "Infinity", "-Infinity")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own handler, except that the echoed input always encodes (its JSON encoder refuses NaN).
    assert isinstance(exc, RequestValidationError)
    errors = json_safe(jsonable_encoder(exc.errors()))
    for error in errors:
        if isinstance(error, dict) and error.get("type") == "finite_number":
            error["msg"] += " (JSON has no NaN or Infinity, and a number beyond ±1.8e308, such as 1e400, reads as one)"
    return JSONResponse({"detail": errors}, status_code=422)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.detail, exc.hint, **(exc.headers or {}))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own 404 (unknown path) and 405 (wrong method), in the API's error shape.
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), **(exc.headers or {}))


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return error_response(404, str(exc), "the audit may have been deleted from the bucket")


async def _invalid_key(request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, str(exc), "audit ids contain only letters, digits, '-', '_' and '.'")


async def _storage_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("storage failure on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        f"object storage failed: {exc}",
        "check DFC_STORE_URL and the DFC_S3_* settings and that the store is up; then retry",
        **{"Retry-After": RETRY_AFTER_S},
    )


async def _submit_failed(request: Request, exc: Exception) -> JSONResponse:
    log.warning("submission failure on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        f"could not hand the audit to Ray: {exc}",
        "check DFC_RAY_ADDRESS and that the Ray cluster is up (GET /readyz); then submit again",
        **{"Retry-After": RETRY_AFTER_S},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    # Connection: close, because the server drops the connection after an unhandled error: a keep-alive client
    # told so opens a new one for its next request instead of having it reset.
    return error_response(
        500, "internal error", "this is a bug; the server log has the details", Connection="close"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; Starlette picks the most specific class, so ObjectNotFound wins over StorageError."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ObjectNotFound, _not_found)
    app.add_exception_handler(InvalidKeyError, _invalid_key)
    app.add_exception_handler(StorageError, _storage_down)
    app.add_exception_handler(SubmitError, _submit_failed)
    app.add_exception_handler(Exception, _unexpected)
