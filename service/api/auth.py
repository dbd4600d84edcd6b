"""Bearer API keys: the dependency every ``/audits`` route declares.

Keys are compared in constant time against every configured key (no early exit), and neither the
presented nor the configured keys are ever logged or echoed in a response.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import ApiError

log = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False, description="An API key from DFC_API_KEYS, sent as `Authorization: Bearer <key>`."
)


class ApiKeys:
    """The accepted keys, as bytes for ``hmac.compare_digest`` (which refuses non-ASCII ``str``)."""

    def __init__(self, keys: list[str], disabled: bool = False) -> None:
        self._keys = [key.encode() for key in keys]
        self.disabled = disabled

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys, disabled={self.disabled})"

    def accepts(self, presented: str) -> bool:
        """Whether ``presented`` is one of the keys, in time independent of which one (or none) matches."""
        given = presented.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        return matched


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def require_api_key(request: Request, credentials: Credentials) -> None:
    """Let the request through with a valid bearer key (or when auth is disabled); 401 otherwise."""
    keys: ApiKeys = request.app.state.api_keys
    if keys.disabled:
        return
    if credentials is not None and keys.accepts(credentials.credentials):
        return
    why = "no bearer API key" if credentials is None else "an API key that is not accepted"
    log.warning("401 for %s %s: %s", request.method, request.url.path, why)
    raise ApiError(
        401,
        f"request carried {why}",
        "send `Authorization: Bearer <key>` with a key configured in DFC_API_KEYS",
        headers={"WWW-Authenticate": "Bearer"},
    )
