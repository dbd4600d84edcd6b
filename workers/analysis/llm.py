"""A client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, llama.cpp, Ollama, LiteLLM…).

It is what ``dfc.analysis.explain`` calls as its ``Chat``. The endpoint is the operator's choice, never the audit
submitter's: it comes from the workers' environment (``DFC_EXPLAINER_*``), so a spec cannot send the key or
the corpus anywhere else. Transient failures (connection errors, timeouts, 429, 5xx) are retried with backoff,
honouring ``Retry-After``; a refused key, a wrong URL or an unknown model are not, and say what to set.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

Message = dict[str, str]
"""A chat message, as ``dfc.analysis.explain.Message`` (not imported: the API reads these settings without dfc)."""
RETRIED_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0


class ExplainerSettings(BaseSettings):
    """The explainer endpoint, read from ``DFC_EXPLAINER_<NAME>`` on the API and on the workers."""

    model_config = SettingsConfigDict(
        env_prefix="DFC_EXPLAINER_", extra="ignore", frozen=True, hide_input_in_errors=True, env_parse_none_str=""
    )

    url: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible API, up to and including /v1 (https://api.openai.com/v1, "
        "http://vllm.llm.svc:8000/v1); empty: this deployment writes no explanations.",
    )
    model: str | None = Field(None, description="Model name the endpoint serves (required with a URL).")
    api_key: SecretStr | None = Field(
        None, description="Bearer key for the endpoint; empty for servers that need none. A secret: workers only."
    )
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Seconds to wait for one reply.")
    max_attempts: int = Field(4, ge=1, le=20, description="Tries per request on connection errors, 429 and 5xx.")
    temperature: float | None = Field(
        0.0, ge=0, le=2, description="Sampling temperature sent with each request; empty: the server's default."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=100_000, description="max_tokens sent with each request; empty: the server's default."
    )

    def problem(self) -> str | None:
        """Why explanations cannot be written with these settings (None: they can)."""
        if not self.url:
            return "no explainer endpoint is configured (DFC_EXPLAINER_URL is empty)"
        if not self.url.startswith(("http://", "https://")):
            return f"DFC_EXPLAINER_URL must be an http(s) URL, got {self.url!r}"
        if not self.model:
            return "DFC_EXPLAINER_MODEL is empty: name the model the endpoint serves"
        return None

    def public_env(self) -> dict[str, str]:
        """The non-secret settings as environment variables (for a Ray job's runtime_env)."""
        values = self.model_dump(exclude={"api_key"})
        return {f"DFC_EXPLAINER_{k.upper()}": str(v) for k, v in values.items() if v is not None}


class ExplainerError(RuntimeError):
    """The endpoint could not answer. ``fatal``: asking again will not help (key, URL or model is wrong)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare from these servers; fall back to our own backoff
        return None


class ChatClient:
    """``POST {url}/chat/completions``; callable as a ``dfc.analysis.explain.Chat``. Counts requests and tokens used."""

    def __init__(self, settings: ExplainerSettings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        problem = settings.problem()
        if problem:
            raise ExplainerError(problem, fatal=True)
        assert settings.url is not None and settings.model is not None
        self.settings, self.sleep = settings, sleep
        self.endpoint = settings.url.rstrip("/") + "/chat/completions"
        self.model = settings.model
        self.requests = 0
        self.tokens = 0

    def _body(self, messages: list[Message]) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False}
        if self.settings.temperature is not None:
            body["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        return json.dumps(body).encode()

    def _request(self, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "dfc-audit"}
        if self.settings.api_key is not None and self.settings.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.settings.api_key.get_secret_value()}"
        return urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")

    def __call__(self, messages: list[Message]) -> str:
        body = self._body(messages)
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            wait = min(MAX_BACKOFF_S, 2.0 ** (attempt - 1))
            try:
                self.requests += 1
                with urllib.request.urlopen(self._request(body), timeout=self.settings.timeout_s) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace").strip()
                if exc.code not in RETRIED_STATUS:
                    raise self._refused(exc.code, detail) from None
                reason = f"HTTP {exc.code} {detail}"
                asked = _retry_after(exc)
                wait = min(MAX_BACKOFF_S, wait if asked is None else asked)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt < attempts:
                log.warning("explainer %s: %s; retrying in %.0f s (%d/%d)", self.endpoint, reason, wait, attempt,
                            attempts)  # fmt: skip
                self.sleep(wait)
        raise ExplainerError(f"the explainer endpoint {self.endpoint} did not answer after {attempts} tries: {reason}")

    def _refused(self, code: int, detail: str) -> ExplainerError:
        hint = {
            401: "the endpoint refused the key: set DFC_EXPLAINER_API_KEY on the workers",
            403: "the endpoint refused the key: set DFC_EXPLAINER_API_KEY on the workers",
            404: f"check that DFC_EXPLAINER_URL ends where /chat/completions is served (often …/v1) and that "
            f"the endpoint serves DFC_EXPLAINER_MODEL={self.model!r}",
        }.get(code, "the endpoint rejected the request; check DFC_EXPLAINER_MODEL and the server's log")
        return ExplainerError(f"the explainer endpoint {self.endpoint} answered HTTP {code} ({detail}): {hint}",
                              fatal=code in (400, 401, 403, 404, 422))  # fmt: skip

    def _content(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ExplainerError(
                f"the explainer endpoint {self.endpoint} did not answer like an OpenAI chat completion: "
                f"{raw[:200].decode('utf-8', 'replace')!r}"
            ) from None
        usage = data.get("usage") or {}
        self.tokens += int(usage.get("total_tokens") or 0)
        if not isinstance(content, str) or not content.strip():
            raise ExplainerError(f"the explainer model {self.model!r} sent an empty reply")
        return content
