"""Bad input is the client's problem: a 4xx that names the field, never a 5xx, and big bodies stop at the door."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.middleware import BodyLimitMiddleware
from tests.service.conftest import API_KEY, FakeSubmitter, make_settings, spec_body
from workers.analysis.llm import ExplainerSettings

# (case, body, the field the 422 must name (a suffix of its loc) or None when any 4xx will do)
BAD_SPECS: list[tuple[str, Any, tuple[Any, ...] | None]] = [
    ("model id with spaces", spec_body(model_a={"id": "not a model"}), ("model_a", "id")),
    ("model id with a URL", spec_body(model_b={"id": "https://evil.example/x"}), ("model_b", "id")),
    ("empty model id", spec_body(model_b={"id": ""}), ("model_b", "id")),
    ("model id not a string", spec_body(model_a={"id": 42}), ("model_a", "id")),
    ("model missing", {"model_a": {"id": "org/a"}}, ("model_b",)),
    ("identical models", spec_body(model_b={"id": "meta-llama/Llama-3.1-8B-Instruct"}), ("body",)),
    ("revision with spaces", spec_body(model_b={"id": "org/b", "revision": "a b"}), ("model_b", "revision")),
    ("revision climbing out", spec_body(model_b={"id": "org/b", "revision": "../../x"}), ("model_b", "revision")),
    ("revision with a .. segment", spec_body(model_a={"id": "org/a", "revision": "v1/../../x"}),
     ("model_a", "revision")),
    ("revision from the root", spec_body(model_b={"id": "org/b", "revision": "/etc"}), ("model_b", "revision")),
    ("revision with a control character", spec_body(model_b={"id": "org/b", "revision": "main\x00"}),
     ("model_b", "revision")),
    ("revision with a git operator", spec_body(model_b={"id": "org/b", "revision": "main~1"}),
     ("model_b", "revision")),
    ("unknown top-level field", spec_body(priority="high"), ("priority",)),
    ("unknown nested field", spec_body(model_a={"id": "org/a", "gpus": 8}), ("model_a", "gpus")),
    ("unknown corpus field", spec_body(corpus={"kind": "builtin", "url": "x"}), ("corpus", "url")),
    ("token_budget 0", spec_body(token_budget=0), ("token_budget",)),
    ("token_budget 10^15", spec_body(token_budget=10**15), ("token_budget",)),
    ("token_budget 10^400", spec_body(token_budget=10**400), ("token_budget",)),
    ("token_budget a string", spec_body(token_budget="lots"), ("token_budget",)),
    ("token_budget fractional", spec_body(token_budget=1000.5), ("token_budget",)),
    ("dead-feature window 10^400", spec_body(training={"dead_after_tokens": 10**400}),
     ("training", "dead_after_tokens")),
    ("corpus max_docs 10^400", spec_body(corpus={"kind": "builtin", "max_docs": 10**400}), ("corpus",)),
    ("ranking weight 1e300", spec_body(ranking={"divergence": 1e300}), ("ranking", "divergence")),
    ("learning rate 10^400", spec_body(training={"lr": 10**400}), ("training", "lr")),
    ("negative seed", spec_body(seed=-1), ("seed",)),
    ("top_features 0", spec_body(top_features=0), ("top_features",)),
    ("max_length too long", spec_body(max_length=10**6), ("max_length",)),
    ("a_only out of range", spec_body(crosscoder={"a_only": 0.7}), ("crosscoder", "a_only")),
    ("dictionary too small", spec_body(crosscoder={"n_features": 2}), ("crosscoder", "n_features")),
    ("zero learning rate", spec_body(training={"lr": 0}), ("training", "lr")),
    ("negative batch", spec_body(training={"batch_size": -8}), ("training", "batch_size")),
    ("unknown architecture", spec_body(crosscoder={"architecture": "mlp"}), ("crosscoder", "architecture")),
    ("huge steering alpha", spec_body(steering={"alphas": [1e9]}), ("steering", "alphas")),
    ("unknown corpus kind", spec_body(corpus={"kind": "web"}), ("corpus", "kind")),
    ("transfer without a vector", spec_body(steering={"transfer": {"name": "x"}}), ("steering", "transfer")),
    ("transfer with a vector and prompts", spec_body(steering={"transfer": {"name": "x", "vector": [1.0],
                                                                            "positive": ["a"], "negative": ["b"]}}),
     ("steering", "transfer")),
    ("transfer with half a contrast", spec_body(steering={"transfer": {"name": "x", "positive": ["a"]}}),
     ("steering", "transfer")),
    ("transfer without steering", spec_body(steering={"enabled": False, "transfer": {"name": "x", "vector": [1.0]}}),
     ("steering",)),
    ("huge transfer coefficient", spec_body(steering={"transfer": {"name": "x", "vector": [1.0], "coefficient": 1e9}}),
     ("steering", "transfer")),
    ("labels not strings", spec_body(labels={"team": ["a"]}), ("labels", "team")),
    ("local model path", spec_body(model_a={"id": "/etc"}), ("model_a", "id")),
    ("relative model path", spec_body(model_b={"id": "../../secrets"}), ("model_b", "id")),
    ("local corpus files", spec_body(corpus={"kind": "files", "paths": ["/etc/passwd"]}), ("corpus", "kind")),
    ("a JSON array", [spec_body()], None),
    ("a JSON string", "audit please", None),
    ("JSON null", None, None),
]


def _names_field(detail: Any, field: tuple[Any, ...]) -> bool:
    return any(tuple(error["loc"][-len(field) :]) == field for error in detail)


@pytest.mark.parametrize(("case", "body", "field"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_422_naming_the_field(
    client: TestClient, submitter: FakeSubmitter, case: str, body: Any, field: tuple[Any, ...] | None
) -> None:
    r = client.post("/audits", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    if field is not None:
        assert _names_field(r.json()["detail"], field), r.json()
    assert submitter.submitted == []


RAW_BODIES: list[tuple[str, bytes, dict[str, str]]] = [
    ("empty body", b"", {"Content-Type": "application/json"}),
    ("not JSON", b"model_a=x&model_b=y", {"Content-Type": "application/json"}),
    ("truncated JSON", json.dumps(spec_body()).encode()[:-5], {"Content-Type": "application/json"}),
    ("invalid UTF-8", b'{"model_a": {"id": "\xff\xfe"}}', {"Content-Type": "application/json"}),
    ("NaN steering alpha", b'{"model_a":{"id":"a/a"},"model_b":{"id":"b/b"},"steering":{"alphas":[NaN]}}', {}),
    ("Infinity budget", b'{"model_a":{"id":"a/a"},"model_b":{"id":"b/b"},"token_budget":Infinity}', {}),
    ("deeply nested JSON", b"[" * 20_000 + b"]" * 20_000, {"Content-Type": "application/json"}),
    ("form content type", b"model_a=x", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("text content type", json.dumps(spec_body()).encode(), {"Content-Type": "text/plain"}),
]


@pytest.mark.parametrize(("case", "raw", "headers"), RAW_BODIES, ids=[c[0] for c in RAW_BODIES])
def test_malformed_bodies_are_4xx_not_5xx(
    client: TestClient, submitter: FakeSubmitter, case: str, raw: bytes, headers: dict[str, str]
) -> None:
    r = client.post("/audits", content=raw, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert submitter.submitted == []


def _raw_spec(fragment: str) -> bytes:
    """A spec body with ``fragment`` (JSON members, as text) after the two models: for numbers ``json`` never writes."""
    return ('{"model_a": {"id": "org/a"}, "model_b": {"id": "org/b"}, ' + fragment + "}").encode()


# (case, the body's extra members as JSON text, the field the 422 must name)
NON_FINITE: list[tuple[str, str, tuple[Any, ...]]] = [
    ("NaN learning rate", '"training": {"lr": NaN}', ("training", "lr")),
    ("Infinity learning rate", '"training": {"lr": Infinity}', ("training", "lr")),
    ("1e400 learning rate", '"training": {"lr": 1e400}', ("training", "lr")),
    ("-Infinity steering alpha", '"steering": {"alphas": [2.0, -Infinity]}', ("steering", "alphas", 1)),
    ("NaN ranking weight", '"ranking": {"strength": NaN}', ("ranking", "strength")),
    ("1e400 ranking threshold", '"ranking": {"nu_eps_max": 1e400}', ("ranking", "nu_eps_max")),
    ("NaN GPUs", '"training": {"num_gpus": NaN}', ("training", "num_gpus")),
    ("Infinity model GPUs", '"model_a": {"id": "org/a", "resources": {"num_gpus": Infinity}}',
     ("model_a", "resources", "num_gpus")),
    ("NaN in a transfer vector", '"steering": {"transfer": {"name": "x", "vector": [1.0, NaN]}}',
     ("steering", "transfer", "vector", 1)),
    ("NaN corpus mix weight",
     '"corpus": {"kind": "mix", "parts": [{"kind": "builtin"}, {"kind": "builtin"}], "weights": [0.5, NaN]}',
     ("corpus", "weights", 1)),
    ("NaN where text belongs", '"labels": {"team": NaN}', ("labels", "team")),
    ("Infinity budget", '"token_budget": Infinity', ("token_budget",)),
]


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"the reply holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("case", "fragment", "field"), NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_and_out_of_range_numbers_are_422_naming_the_field(
    client: TestClient, submitter: FakeSubmitter, case: str, fragment: str, field: tuple[Any, ...]
) -> None:
    r = client.post("/audits", content=_raw_spec(fragment), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = _strict_json(r.text)["detail"]
    assert _names_field(detail, field), detail
    assert submitter.submitted == []


def test_revisions_the_hub_accepts_are_accepted(client: TestClient, submitter: FakeSubmitter) -> None:
    for revision in ("main", "v1.0", "refs/pr/12", "feature/new-head", "0123456789abcdef0123456789abcdef01234567"):
        r = client.post("/audits", json=spec_body(model_b={"id": "Qwen/Qwen3-8B", "revision": revision}))
        assert r.status_code == 202, (revision, r.text)
    assert len(submitter.submitted) == 5


@contextmanager
def served(app: Any) -> Iterator[int]:
    """``app`` behind a real uvicorn server on a free loopback port, for what only a real connection shows."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            thread.join(0.02)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _exchange(sock: socket.socket, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open connection, and its reply (status, headers, body)."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body)
    reply = http.client.HTTPResponse(sock, method=method)
    reply.begin()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()


def test_a_non_finite_number_leaves_the_keep_alive_connection_usable(store_dir) -> None:
    submitter = FakeSubmitter()
    with served(create_app(make_settings(store_dir), submitter)) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # fmt: skip
        status, headers, body = _exchange(sock, "POST", "/audits", _raw_spec('"training": {"lr": NaN}'))
        assert status == 422 and _names_field(_strict_json(body.decode())["detail"], ("training", "lr"))
        assert headers.get("connection") != "close"
        # The same connection answers the next request.
        status, _, body = _exchange(sock, "POST", "/audits", json.dumps(spec_body()).encode())
        assert status == 202, body
    assert len(submitter.submitted) == 1


def test_an_unexpected_error_tells_a_keep_alive_client_to_reconnect(store_dir, submitter: FakeSubmitter) -> None:
    app = create_app(make_settings(store_dir), submitter)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail 42")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500 and r.headers["connection"] == "close"
    assert "bug" in r.json()["hint"] and "secret detail" not in r.text  # the details stay in the server's log


@pytest.mark.parametrize("key", ["has space", "x" * 256, ""])
def test_malformed_idempotency_key_is_422(client: TestClient, key: str) -> None:
    r = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": key})
    assert r.status_code == 422
    assert _names_field(r.json()["detail"], ("Idempotency-Key",))


@pytest.mark.parametrize("path", ["/audits/..", "/audits/a%2F..%2Fb", "/audits/%00", "/audits/-x/report"])
def test_hostile_audit_ids_never_reach_the_store(client: TestClient, path: str) -> None:
    assert 400 <= client.get(path).status_code < 500


def test_local_paths_are_accepted_when_the_operator_allows_them(store_dir) -> None:
    app = create_app(make_settings(store_dir, allow_local_paths=True), FakeSubmitter())
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert c.post("/audits", json=spec_body(model_a={"id": "/models/tiny-a"})).status_code == 202


def test_explanations_are_refused_where_no_explainer_is_configured_and_accepted_where_one_is(store_dir) -> None:
    body = spec_body(explain={"enabled": True})
    for explainer, expected in ((ExplainerSettings(url=None, model=None), 422),
                                (ExplainerSettings(url="http://vllm:8000/v1", model="m"), 202)):  # fmt: skip
        submitter = FakeSubmitter()
        app = create_app(make_settings(store_dir / str(expected), explainer=explainer), submitter)
        with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            r = c.post("/audits", json=body)
        assert r.status_code == expected, r.text
        if expected == 422:
            assert _names_field(r.json()["detail"], ("explain", "enabled")) and not submitter.submitted
            assert "DFC_EXPLAINER_URL" in json.dumps(r.json())


def test_body_over_the_limit_is_413_by_content_length(client: TestClient, submitter: FakeSubmitter) -> None:
    body = spec_body(labels={"padding": "x" * (64 * 1024)})
    r = client.post("/audits", json=body)
    assert r.status_code == 413
    assert "DFC_MAX_BODY_BYTES" in r.json()["hint"]
    assert submitter.submitted == []
    metrics = client.get("/metrics").text
    assert 'dfc_http_requests_total{method="POST",route="/audits",status="413"} 1.0' in metrics


def test_streamed_body_over_the_limit_is_413_without_content_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"labels": {"padding": "'
        for _ in range(40):
            yield b"x" * 2048
        yield b'"}}'

    r = client.post("/audits", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_limit_counts_streamed_bytes_and_never_calls_the_app() -> None:
    """Chunks without Content-Length are counted as they arrive; the app never sees an oversized body."""
    called = False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal called
        called = True

    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True} for _ in range(3)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/audits", "headers": [], "query_string": b""}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1024)(scope, receive, send))
    assert not called
    assert sent[0]["status"] == 413
    assert len(chunks) == 1, "reading stopped at the first chunk past the limit"


def test_a_body_just_under_the_limit_is_read_whole(store_dir) -> None:
    app = create_app(make_settings(store_dir, max_body_bytes=4096), FakeSubmitter())
    body = spec_body(labels={"note": "y" * 3000})
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert c.post("/audits", json=body).status_code == 202
        assert c.post("/audits", json=spec_body(labels={"note": "y" * 5000})).status_code == 413
