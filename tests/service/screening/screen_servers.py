"""Loopback HTTP servers for the screening tests: a stand-in Hugging Face Hub API and a recording audit API.

The Hub answers the two routes ``huggingface_hub.HfApi`` calls, in the shapes the real Hub returns:
``GET /api/models?author=…&sort=lastModified&expand=…`` (a JSON list, newest first, paginated with a
``Link: <…>; rel="next"`` header, only ``_id``, ``id`` and the expanded fields per item) and
``GET /api/models/{org}/{name}/revision/{sha}`` (one model's info; gated ones without access answer 403 with
``X-Error-Code: GatedRepo``, unknown ones 404 with ``X-Error-Code: RepoNotFound``).

``WATCH`` and ``populate`` are the watch list and the Hub's releases that the screening tests share.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from tests.fixtures.http import JSONHandler

PAGE_SIZE = 2
"""Small pages, so a listing needs the Link header and an early stop saves requests."""


def hub_model(
    model_id: str,
    last_modified: str,
    *,
    architectures: list[str] | None = None,
    pipeline_tag: str | None = "text-generation",
    parameters: int | None = 7_000_000_000,
    gated: bool | str = False,
    private: bool = False,
    auto_map: bool = False,
    sha: str | None = None,
) -> dict[str, Any]:
    """One model as the Hub's ``/api/models/{id}`` describes it (the fields the screener can ask for)."""
    config: dict[str, Any] = {"architectures": architectures or ["LlamaForCausalLM"], "model_type": "llama"}
    if auto_map:
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    return {
        "_id": uuid.uuid5(uuid.NAMESPACE_URL, model_id).hex[:24],
        "id": model_id,
        "author": model_id.split("/")[0],
        "sha": sha or uuid.uuid5(uuid.NAMESPACE_URL, model_id + last_modified).hex + "abcdefgh",
        "lastModified": last_modified,
        "createdAt": last_modified,
        "private": private,
        "gated": gated,
        "disabled": False,
        "pipeline_tag": pipeline_tag,
        "library_name": "transformers",
        "tags": ["transformers", "safetensors", config["model_type"]],
        "downloads": 0,
        "likes": 0,
        "config": config,
        "safetensors": {"parameters": {"BF16": parameters}, "total": parameters} if parameters else None,
        "siblings": [{"rfilename": "config.json"}, {"rfilename": "model.safetensors"}],
    }


@dataclass
class HubState:
    """The models the stand-in Hub serves and the requests it received."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    no_access: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)

    def add(self, model: dict[str, Any]) -> dict[str, Any]:
        self.models[model["id"]] = model
        return model

    def info_requests(self) -> list[str]:
        return [path for path in self.requests if path.startswith("/api/models/")]


@dataclass
class ApiState:
    """What the stand-in audit API received; it dedupes by Idempotency-Key like the real one."""

    api_key: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    ids_by_key: dict[str, str] = field(default_factory=dict)
    fail_next: int = 0
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def keys_posted(self) -> list[str]:
        return [post["idempotency_key"] for post in self.posts]


def _hub_handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(JSONHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server names it)
            url = urlparse(self.path)
            state.requests.append(url.path)
            query = parse_qs(url.query)
            if url.path == "/api/models":
                self._list(query)
            elif url.path.startswith("/api/models/"):
                self._info(url.path.removeprefix("/api/models/"), query)
            else:
                self._json(404, {"error": "not found"})

        def _list(self, query: dict[str, list[str]]) -> None:
            if query.get("sort") != ["lastModified"]:  # the screener must ask for the newest first
                self._json(400, {"error": "expected sort=lastModified"})
                return
            author = query.get("author", [""])[0]
            rows = sorted(
                (m for m in state.models.values() if m["author"] == author),
                key=lambda m: m["lastModified"],
                reverse=True,
            )
            start = int(query.get("cursor", ["0"])[0])
            expand = query.get("expand", [])
            page = [{"_id": m["_id"], "id": m["id"], **{k: m[k] for k in expand if k in m}} for m in rows]
            page = page[start : start + PAGE_SIZE]
            headers = {}
            if start + PAGE_SIZE < len(rows):
                params = {k: v for k, v in query.items() if k != "cursor"} | {"cursor": [str(start + PAGE_SIZE)]}
                host, port = self.server.server_address[:2]
                headers["Link"] = f'<http://{host}:{port}/api/models?{urlencode(params, doseq=True)}>; rel="next"'
            self._json(200, page, headers)

        def _info(self, rest: str, query: dict[str, list[str]]) -> None:
            model_id, _, revision = rest.partition("/revision/")
            model = state.models.get(model_id)
            if model is None or (revision and revision != model["sha"]):
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            if model_id in state.no_access:
                self._json(403, {"error": "Access to model is restricted"}, {"X-Error-Code": "GatedRepo"})
                return
            expand = query.get("expand")
            self._json(200, {k: v for k, v in model.items() if not expand or k in expand or k in ("_id", "id")})

    return Handler


def _api_handler(state: ApiState) -> type[BaseHTTPRequestHandler]:
    class Handler(JSONHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server names it)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if self.path != "/audits":
                self._json(404, {"detail": "not found"})
                return
            if self.headers.get("Authorization") != f"Bearer {state.api_key}":
                self._json(401, {"detail": "request carried no bearer API key"})
                return
            time.sleep(state.delay_s)  # widens the window in which two screeners could race
            key = self.headers.get("Idempotency-Key", "")
            with state.lock:
                state.posts.append({"idempotency_key": key, "body": body})
                if state.fail_next > 0:
                    state.fail_next -= 1
                    self._json(503, {"detail": "Ray is unavailable; retry later"})
                    return
                created = key not in state.ids_by_key
                audit_id = state.ids_by_key.setdefault(key, f"audit-{len(state.ids_by_key) + 1:04d}")
            self._json(202 if created else 200, {"id": audit_id, "state": "queued", "spec": body})

    return Handler


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port in a thread; yield its base URL; stop it afterwards."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def hub_server(state: HubState) -> Any:
    """Context manager: the stand-in Hub, yielding its endpoint URL."""
    return serve(_hub_handler(state))


def api_server(state: ApiState) -> Any:
    """Context manager: the recording audit API, yielding its base URL."""
    return serve(_api_handler(state))


API_KEY = "screening-key-0123456789abcdef"
NOW = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
WATCH = {
    "defaults": {"max_parameters": "20B", "initial_since": "2026-01-01T00:00:00Z", "spec": {"token_budget": 50_000}},
    "watch": [
        {"pattern": "acme/*", "reference": "trusted/base-8b@0123456789abcdef0123456789abcdef01234567"},
        {"pattern": "other/small-*", "reference": "trusted/base-8b", "spec": {"steering": {"enabled": False}}},
    ],
}


def populate(hub: HubState) -> None:
    """Releases of two organisations: two good causal LMs and one of each kind the screener must skip."""
    hub.add(hub_model("acme/chat-7b", "2026-02-10T12:00:00.000Z"))
    hub.add(hub_model("acme/chat-1b", "2026-02-09T08:30:00.000Z", architectures=["Qwen3ForCausalLM"], parameters=10**9))
    hub.add(
        hub_model(
            "acme/encoder", "2026-02-08T00:00:00.000Z", architectures=["BertForMaskedLM"], pipeline_tag="fill-mask"
        )
    )
    hub.add(
        hub_model(
            "acme/t5-xl",
            "2026-02-07T00:00:00.000Z",
            architectures=["T5ForConditionalGeneration"],
            pipeline_tag="text2text-generation",
        )
    )
    hub.add(hub_model("acme/giant-400b", "2026-02-06T00:00:00.000Z", parameters=400 * 10**9))
    hub.add(hub_model("acme/gated-8b", "2026-02-05T00:00:00.000Z", gated="manual"))
    hub.add(hub_model("acme/custom-3b", "2026-02-04T00:00:00.000Z", auto_map=True))
    hub.add(hub_model("acme/gguf-only", "2026-02-03T00:00:00.000Z", parameters=None))
    hub.add(hub_model("acme/ancient-1b", "2025-06-01T00:00:00.000Z"))  # before initial_since: never looked at
    hub.add(hub_model("other/small-lm", "2026-02-02T00:00:00.000Z", parameters=5 * 10**8))
    hub.add(hub_model("other/big-thing", "2026-02-11T00:00:00.000Z"))  # does not match other/small-*
