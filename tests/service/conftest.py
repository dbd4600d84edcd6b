"""Fixtures of the API tests: settings on a temporary store, a recording fake submitter, a client with a key."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from huggingface_hub import HfApi, constants

from service.api.app import create_app
from service.screening.screen import AuditClient
from service.settings import Settings
from service.submission.base import SubmitError
from tests.service.screening.screen_servers import API_KEY as SCREEN_API_KEY
from tests.service.screening.screen_servers import ApiState, HubState, api_server, hub_server, populate
from workers.analysis.llm import ExplainerSettings

API_KEY = "test-key-5f0c1d2e3a4b5c6d7e8f"
OTHER_KEY = "second-key-00112233445566778899"


class FakeSubmitter:
    """Records what the API asks of Ray; can be told to fail or to report Ray as unavailable."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.fail_with: str | None = None
        self.readiness = (True, "fake Ray is up")
        self._lock = threading.Lock()

    def submit(self, audit_id: str) -> None:
        if self.fail_with:
            raise SubmitError(self.fail_with)
        with self._lock:
            self.submitted.append(audit_id)

    def stop(self, audit_id: str) -> None:
        self.stopped.append(audit_id)

    def ready(self) -> tuple[bool, str]:
        return self.readiness

    def close(self) -> None:
        pass


def spec_body(**overrides: Any) -> dict[str, Any]:
    """A small valid audit spec as a request body; keyword arguments replace top-level fields."""
    body: dict[str, Any] = {
        "model_a": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
        "model_b": {"id": "Qwen/Qwen3-8B"},
        "token_budget": 100_000,
    }
    body.update(overrides)
    return body


def make_settings(store: Path | str, **overrides: Any) -> Settings:
    """Settings for a test app: explicit values only, so a DFC_* variable in the environment changes nothing."""
    values: dict[str, Any] = {"store_url": str(store), "api_keys": f"{API_KEY},{OTHER_KEY}", "metrics_cache_s": 0,
                              "explainer": ExplainerSettings(url=None, model=None, api_key=None)}  # fmt: skip
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """The local folder standing in for the bucket."""
    return tmp_path / "bucket"


@pytest.fixture
def submitter() -> FakeSubmitter:
    return FakeSubmitter()


@pytest.fixture
def settings(store_dir: Path) -> Settings:
    return make_settings(store_dir)


@pytest.fixture
def client(settings: Settings, submitter: FakeSubmitter) -> Iterator[TestClient]:
    """A client of a fresh app that sends the API key on every request."""
    with TestClient(create_app(settings, submitter), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture
def anonymous(settings: Settings, submitter: FakeSubmitter) -> Iterator[TestClient]:
    """A client of a fresh app that sends no API key."""
    with TestClient(create_app(settings, submitter)) as c:
        yield c


# --- the screening tests' stand-ins (tests/service/screening/screen_servers.py), shared by test_screen*.py


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/conftest.py sets HF_HUB_OFFLINE=1 so nothing reaches huggingface.co; the screening tests only
    reach the stand-in Hub on 127.0.0.1, so they turn it back on."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub() -> Iterator[tuple[HubState, HfApi]]:
    """A stand-in Hub on loopback holding `populate`'s releases, and a real `HfApi` client for it."""
    state = HubState()
    populate(state)
    with hub_server(state) as endpoint:
        yield state, HfApi(endpoint=endpoint, token=False)


@pytest.fixture
def api() -> Iterator[tuple[ApiState, AuditClient]]:
    """A stand-in audit API on loopback that records submissions, and the screener's client for it."""
    state = ApiState(api_key=SCREEN_API_KEY)
    with api_server(state) as url:
        client = AuditClient(url, SCREEN_API_KEY, timeout_s=10)
        yield state, client
        client.close()
