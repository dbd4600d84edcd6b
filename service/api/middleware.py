"""ASGI middleware: a hard request-body limit, and per-request metrics and log lines.

Both are plain ASGI (not ``BaseHTTPMiddleware``) so they see every response, including the 413 the
limit sends before routing and the 500 of an unhandled error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.api.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """Answer 413 when Content-Length, or the bytes actually streamed, exceed ``max_bytes``.

    The body is read (at most ``max_bytes``) before the app runs and replayed to it; API bodies are
    small, and reading first means an oversized chunked upload is stopped before any handler runs.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"request body exceeds {self.max_bytes} bytes",
            "audit specs are small JSON documents; the limit is DFC_MAX_BODY_BYTES",
            Connection="close",
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "Content-Length is not a number")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for disconnect, as the server would

        await self.app(scope, replay, send)


class RequestMetricsMiddleware:
    """Count and time every request by method, route template and status; log one line without headers."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return str(route.path)
        # Not routed (a 413 answered before routing, a 405): find the template, so labels stay bounded.
        matches = [(candidate.matches(scope)[0], candidate) for candidate in self.routes]
        for wanted in (Match.FULL, Match.PARTIAL):
            for match, candidate in matches:
                if match is wanted and hasattr(candidate, "path"):
                    return str(candidate.path)
        return "<unmatched>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            elapsed = time.perf_counter() - start
            method, route = scope["method"], self._route(scope)
            self.metrics.observe_request(method, route, status, elapsed)
            log.info("%s %s -> %d in %.1f ms", method, scope["path"], status, elapsed * 1000)
