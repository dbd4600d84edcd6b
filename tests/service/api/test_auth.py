"""Bearer API keys: required on /audits, never on the probes, and never leaked into logs or responses."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app
from service.api.auth import ApiKeys
from service.settings import Settings
from tests.service.conftest import API_KEY, OTHER_KEY, FakeSubmitter, make_settings, spec_body

PROTECTED = [
    ("POST", "/audits"),
    ("GET", "/audits"),
    ("GET", "/audits/20990101-000000-deadbeef"),
    ("DELETE", "/audits/20990101-000000-deadbeef"),
    ("GET", "/audits/20990101-000000-deadbeef/report"),
    ("GET", "/audits/20990101-000000-deadbeef/report.html"),
    ("GET", "/audits/20990101-000000-deadbeef/report/url"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key-0000000000000", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer"]
)
def test_audit_routes_refuse_missing_or_wrong_keys(
    anonymous: TestClient, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    r = anonymous.request(method, path, headers=headers, json=spec_body() if method == "POST" else None)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["hint"] and "DFC_API_KEYS" in r.json()["hint"]


@pytest.mark.parametrize("key", [API_KEY, OTHER_KEY])
def test_every_configured_key_is_accepted(anonymous: TestClient, key: str) -> None:
    assert anonymous.get("/audits", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert anonymous.get("/audits", headers={"Authorization": f"bearer {key}"}).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_probes_and_metrics_need_no_key(anonymous: TestClient, path: str) -> None:
    assert anonymous.get(path).status_code == 200


def test_keys_never_reach_logs_or_response_bodies(
    anonymous: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-secret-key-9a8b7c6d5e4f"
    bodies: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for key in (API_KEY, wrong, OTHER_KEY):
            auth = {"Authorization": f"Bearer {key}"}
            for r in (
                anonymous.post("/audits", json=spec_body(), headers=auth),
                anonymous.post("/audits", json={"model_a": "bad"}, headers=auth),
                anonymous.get("/audits/20990101-000000-deadbeef", headers=auth),
                anonymous.get("/audits", params={"limit": 0}, headers=auth),
                anonymous.get("/readyz", headers=auth),
                anonymous.get("/metrics", headers=auth),
            ):
                bodies.append(r.text + str(r.headers))
    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    assert "401 for" in logged, "the rejected request was logged (without its key)"
    for key in (API_KEY, OTHER_KEY, wrong):
        assert key not in logged
        assert all(key not in body for body in bodies)


def test_settings_never_print_their_secrets() -> None:
    settings = make_settings("/tmp/unused", s3_secret_key="s3-secret-abcdef0123456789")
    text = repr(settings) + str(settings) + str(settings.model_dump())
    assert API_KEY not in text and "s3-secret-abcdef0123456789" not in text
    assert API_KEY not in repr(ApiKeys(settings.api_key_list()))


def test_api_keys_are_required_unless_auth_is_explicitly_disabled(tmp_path) -> None:
    with pytest.raises(ValidationError, match="DFC_API_KEYS"):
        Settings(store_url=str(tmp_path), api_keys="")
    with pytest.raises(ValidationError, match="shorter than 16") as info:
        Settings(store_url=str(tmp_path), api_keys=f"{API_KEY},short-key")
    assert "short-key" not in str(info.value), "the error counts short keys without quoting them"
    open_app = create_app(Settings(store_url=str(tmp_path), auth_disabled=True), FakeSubmitter())
    with TestClient(open_app) as c:
        assert c.get("/audits").status_code == 200


def test_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DFC_API_KEYS", f" {API_KEY} , {OTHER_KEY} ,")
    monkeypatch.setenv("DFC_STORE_URL", str(tmp_path))
    settings = Settings()
    assert settings.api_key_list() == [API_KEY, OTHER_KEY]
    assert settings.store_url == str(tmp_path)
