"""The last screening run on the API's `/metrics`: a real pass (stand-in Hub and audit API) into a real bucket,
read back by the app at scrape time."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from huggingface_hub import HfApi
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.screening.screen import AuditClient, Screener
from service.screening.summary import LATEST_KEY, SKIP_REASONS, ModelResult, ScreeningSummary, write_summary
from service.screening.watchlist import WatchList
from tests.fixtures.s3 import S3Server
from tests.service.conftest import FakeSubmitter, make_settings
from tests.service.screening.screen_servers import (
    NOW,
    WATCH,
    hub_model,
)
from workers.storage import LocalStore, ObjectStore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SCREENING_LAST_RUN = (
    "dfc_screening_last_run_success",
    "dfc_screening_last_run_duration_seconds",
    "dfc_screening_last_run_models_seen",
    "dfc_screening_last_run_models_submitted",
    "dfc_screening_last_run_models_skipped",
    "dfc_screening_last_run_models_errors",
)


pytestmark = pytest.mark.usefixtures("hub_online")  # hub and api: tests/service/conftest.py


def ticking(start: dt.datetime) -> Callable[[], dt.datetime]:
    """A clock that moves one second per reading, so a run has a non-zero duration."""
    ticks = itertools.count()
    return lambda: start + dt.timedelta(seconds=next(ticks))


def screen(hf: HfApi, store: ObjectStore, client: AuditClient, start: dt.datetime) -> ScreeningSummary:
    """One real screening pass over the shared watch list."""
    return Screener(WatchList.model_validate(WATCH), hf, store, client.submit, clock=ticking(start)).run()


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def screening(samples: Samples) -> dict[str, float]:
    """The screening series of a scrape by name (plus ``{reason}`` for labelled ones)."""
    return {
        name + (f"{{{labels[0][1]}}}" if labels else ""): value
        for (name, labels), value in samples.items()
        if name.startswith("dfc_screening_")
    }


def test_metrics_show_seen_submitted_and_skipped_by_reason_of_a_pass_into_s3(hub, api, s3_server: S3Server) -> None:
    (_, hf), (_, audit_api) = hub, api
    prefix = f"screen-metrics-{uuid.uuid4().hex[:8]}"
    settings = make_settings(
        f"s3://{s3_server.bucket}/{prefix}",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    summary = screen(hf, s3_server.store(prefix), audit_api, NOW)

    with TestClient(create_app(settings, FakeSubmitter())) as client:
        got = screening(scrape(client))

    assert got["dfc_screening_up"] == 1
    assert got["dfc_screening_last_run_models_seen"] == 9
    assert got["dfc_screening_last_run_models_submitted"] == 3
    skipped = {
        k.split("{")[1].rstrip("}"): v for k, v in got.items() if k.startswith("dfc_screening_last_run_models_skipped{")
    }
    assert {k: v for k, v in skipped.items() if v} == {
        "not_causal_lm": 2,
        "too_large": 1,
        "gated": 1,
        "custom_code": 1,
        "no_safetensors": 1,
    }
    assert set(skipped) == set(SKIP_REASONS)  # every known reason is a series (0 if none); nothing else
    assert got["dfc_screening_last_run_models_errors{hub_error}"] == 0
    assert got["dfc_screening_last_run_models_errors{submit_failed}"] == 0
    assert got["dfc_screening_last_run_success"] == 1
    assert summary.finished_at is not None
    assert got["dfc_screening_last_run_timestamp_seconds"] == summary.finished_at.timestamp()
    assert got["dfc_screening_last_success_timestamp_seconds"] == summary.finished_at.timestamp()
    duration = (summary.finished_at - summary.started_at).total_seconds()
    assert got["dfc_screening_last_run_duration_seconds"] == duration > 0


def test_before_any_run_the_timestamps_are_zero_and_the_last_run_series_absent(hub, api, tmp_path: Path) -> None:
    (_, hf), (_, audit_api) = hub, api
    bucket = tmp_path / "bucket"
    with TestClient(create_app(make_settings(bucket), FakeSubmitter())) as client:
        response = client.get("/metrics")
        before = screening(scrape(client))
        families = {f.name for f in text_string_to_metric_families(response.text)}

        assert before == {
            "dfc_screening_up": 1,
            "dfc_screening_last_run_timestamp_seconds": 0,
            "dfc_screening_last_success_timestamp_seconds": 0,
        }
        assert set(SCREENING_LAST_RUN) <= families  # declared (HELP/TYPE), without samples

        summary = screen(hf, LocalStore(bucket), audit_api, NOW)  # the app reads the bucket on each scrape
        after = screening(scrape(client))

    assert after["dfc_screening_last_run_models_submitted"] == 3
    assert after["dfc_screening_last_run_timestamp_seconds"] == summary.finished_at.timestamp() > 0


def test_a_run_with_errors_keeps_the_time_of_the_last_clean_run(hub, api, tmp_path: Path) -> None:
    (hub_state, hf), (api_state, audit_api) = hub, api
    bucket = tmp_path / "bucket"
    clean = screen(hf, LocalStore(bucket), audit_api, NOW)
    hub_state.add(hub_model("acme/chat-13b", "2026-03-01T06:00:00.000Z"))
    api_state.fail_next = 1  # the API refuses the new model's POST
    failed = screen(hf, LocalStore(bucket), audit_api, NOW + dt.timedelta(hours=1))

    with TestClient(create_app(make_settings(bucket), FakeSubmitter())) as client:
        got = screening(scrape(client))

    assert failed.counts == {"seen": 1, "submitted": 0, "skipped": 0, "errors": 1}
    assert got["dfc_screening_last_run_success"] == 0
    assert got["dfc_screening_last_run_models_errors{submit_failed}"] == 1
    assert got["dfc_screening_last_run_models_seen"] == 1
    assert got["dfc_screening_last_run_timestamp_seconds"] == failed.finished_at.timestamp()
    assert got["dfc_screening_last_success_timestamp_seconds"] == clean.finished_at.timestamp()


def test_an_unknown_reason_is_counted_as_other(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    summary = ScreeningSummary(run_id="newer", started_at=NOW, finished_at=NOW + dt.timedelta(seconds=3))
    summary.models = [
        ModelResult(model="acme/x", revision="abc", watch="acme/*", outcome="skipped", reason="quantized_only"),
        ModelResult(model="acme/y", revision="def", watch="acme/*", outcome="skipped", reason="gated"),
    ]
    summary.tally()
    write_summary(LocalStore(bucket), summary)

    with TestClient(create_app(make_settings(bucket), FakeSubmitter())) as client:
        samples = scrape(client)

    reasons = {dict(labels)["reason"] for name, labels in samples if name == "dfc_screening_last_run_models_skipped"}
    assert "quantized_only" not in reasons and reasons == {*SKIP_REASONS, "other"}
    got = screening(samples)
    assert got["dfc_screening_last_run_models_skipped{other}"] == 1
    assert got["dfc_screening_last_run_models_skipped{gated}"] == 1
    assert got["dfc_screening_last_run_duration_seconds"] == 3


def test_a_corrupt_summary_gives_up_zero_logged_once_and_the_scrape_still_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = tmp_path / "bucket"
    store = LocalStore(bucket)
    store.put_bytes(LATEST_KEY, b'{"run_id": "half-writ')
    caplog.set_level(logging.INFO, logger="service.api.metrics")

    with TestClient(create_app(make_settings(bucket), FakeSubmitter())) as client:
        first, second = scrape(client), scrape(client)
        write_summary(store, ScreeningSummary(run_id="good", started_at=NOW, finished_at=NOW))
        recovered = screening(scrape(client))

    for samples in (first, second):
        assert screening(samples) == {"dfc_screening_up": 0}
        assert samples[("dfc_store_up", ())] == 1  # the audit metrics are unaffected
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "screening summary" in r.getMessage()]
    assert len(warnings) == 1 and "not valid JSON" in warnings[0].getMessage()
    assert any("again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert recovered["dfc_screening_up"] == 1 and recovered["dfc_screening_last_run_models_seen"] == 0


def test_an_unreachable_bucket_does_not_fail_the_scrape(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(
        "s3://audits/prefix",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_access_key="nobody",
        s3_secret_key="nothing-secret-here",
        s3_connect_timeout_s=1,
        s3_max_attempts=1,
    )
    with TestClient(create_app(settings, FakeSubmitter())) as client:
        got = screening(scrape(client))

    assert got == {"dfc_screening_up": 0}


def test_the_summary_is_read_at_most_once_per_cache_period(hub, api, tmp_path: Path) -> None:
    (_, hf), (_, audit_api) = hub, api
    bucket = tmp_path / "bucket"
    with TestClient(create_app(make_settings(bucket, metrics_cache_s=300), FakeSubmitter())) as client:
        before = screening(scrape(client))
        screen(hf, LocalStore(bucket), audit_api, NOW)
        cached = screening(scrape(client))

    assert cached == before and cached["dfc_screening_last_run_timestamp_seconds"] == 0
