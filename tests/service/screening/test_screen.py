"""Continuous screening: the real `huggingface_hub` client against a stand-in Hub, submissions to a stand-in API."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import HfApi

from service.screening.screen import LATEST_KEY, WATERMARK_KEY, AuditClient, Screener, ScreeningSummary, main
from service.screening.watchlist import WatchList, WatchListError, load_watch_list
from tests.service.screening.screen_servers import (
    API_KEY,
    NOW,
    WATCH,
    hub_model,
)
from workers.storage import LocalStore

pytestmark = pytest.mark.usefixtures("hub_online")  # hub and api: tests/service/conftest.py


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


def screener(hub: HfApi, store: LocalStore, client: AuditClient | None, **kwargs: Any) -> Screener:
    return Screener(
        WatchList.model_validate(WATCH), hub, store, client.submit if client else None, clock=lambda: NOW, **kwargs
    )


def outcomes(summary: ScreeningSummary) -> dict[str, tuple[str, str | None]]:
    return {m.model: (m.outcome, m.reason) for m in summary.models}


def test_new_causal_models_are_submitted_once_with_the_revision_idempotency_key(hub, api, store) -> None:
    (hub_state, hf), (api_state, client) = hub, api
    summary = screener(hf, store, client).run()

    chat7, chat1, small = (hub_state.models[m]["sha"] for m in ("acme/chat-7b", "acme/chat-1b", "other/small-lm"))
    assert sorted(api_state.keys_posted()) == sorted(
        [f"screen:acme/chat-7b@{chat7}", f"screen:acme/chat-1b@{chat1}", f"screen:other/small-lm@{small}"]
    )
    post = next(p for p in api_state.posts if p["idempotency_key"].startswith("screen:acme/chat-7b@"))
    assert post["body"]["model_a"] == {"id": "trusted/base-8b", "revision": "0123456789abcdef0123456789abcdef01234567"}
    assert post["body"]["model_b"] == {"id": "acme/chat-7b", "revision": chat7}  # pinned to the listed commit
    assert post["body"]["token_budget"] == 50_000  # defaults.spec applies
    assert post["body"]["labels"] == {"source": "screening", "watch": "acme/*"}
    small_post = next(p for p in api_state.posts if "other/small-lm" in p["idempotency_key"])
    assert small_post["body"]["steering"] == {"enabled": False}  # the entry's own override
    assert summary.counts == {"seen": 9, "submitted": 3, "skipped": 6, "errors": 0}
    assert {m.audit_id for m in summary.models if m.outcome == "submitted"} == {
        "audit-0001",
        "audit-0002",
        "audit-0003",
    }


def test_unsuitable_models_are_skipped_with_their_reasons(hub, api, store) -> None:
    (_, hf), (_, client) = hub, api
    summary = screener(hf, store, client).run()

    got = outcomes(summary)
    assert got["acme/encoder"] == ("skipped", "not_causal_lm")
    assert got["acme/t5-xl"] == ("skipped", "not_causal_lm")
    assert got["acme/giant-400b"] == ("skipped", "too_large")
    assert got["acme/gated-8b"] == ("skipped", "gated")
    assert got["acme/custom-3b"] == ("skipped", "custom_code")
    assert got["acme/gguf-only"] == ("skipped", "no_safetensors")
    assert "acme/ancient-1b" not in got and "other/big-thing" not in got
    assert summary.skipped_by_reason == {
        "not_causal_lm": 2,
        "too_large": 1,
        "gated": 1,
        "custom_code": 1,
        "no_safetensors": 1,
    }
    giant = next(m for m in summary.models if m.model == "acme/giant-400b")
    assert giant.parameters == 400 * 10**9 and "limit 20,000,000,000" in (giant.detail or "")


def test_a_second_run_submits_nothing_and_stops_at_the_watermark(hub, api, store) -> None:
    (hub_state, hf), (api_state, client) = hub, api
    screener(hf, store, client).run()
    posts_before, requests_before = len(api_state.posts), len(hub_state.requests)

    again = screener(hf, store, client).run()

    assert len(api_state.posts) == posts_before
    assert again.counts["seen"] == 0
    # The watermark ends each listing at its first (newest) item: one list request per entry, no model_info.
    assert hub_state.requests[requests_before:] == ["/api/models", "/api/models"]
    assert store.get_json(WATERMARK_KEY)["entries"] == {
        "acme/*": "2026-02-10T12:00:00+00:00",
        "other/small-*": "2026-02-11T00:00:00+00:00",
    }


def test_a_new_revision_of_a_screened_model_is_submitted_again(hub, api, store) -> None:
    (hub_state, hf), (api_state, client) = hub, api
    screener(hf, store, client).run()
    updated = hub_state.add(hub_model("acme/chat-7b", "2026-02-20T00:00:00.000Z"))

    summary = screener(hf, store, client).run()

    assert outcomes(summary) == {"acme/chat-7b": ("submitted", None)}
    assert api_state.keys_posted()[-1] == f"screen:acme/chat-7b@{updated['sha']}"


def test_concurrent_runs_never_submit_a_model_twice(hub, api, store) -> None:
    (_, hf), (api_state, client) = hub, api
    api_state.delay_s = 0.2  # both runs are mid-submission at the same time
    summaries: list[ScreeningSummary] = []
    runs = [threading.Thread(target=lambda: summaries.append(screener(hf, store, client).run())) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=30)

    keys = api_state.keys_posted()
    assert len(keys) == len(set(keys)) == 3  # each of the three models POSTed exactly once
    submitted = [m.model for s in summaries for m in s.models if m.outcome == "submitted"]
    assert sorted(submitted) == ["acme/chat-1b", "acme/chat-7b", "other/small-lm"]


def test_a_failed_submission_is_retried_by_the_next_run(hub, api, store) -> None:
    (_, hf), (api_state, client) = hub, api
    api_state.fail_next = 1  # the API is briefly unavailable for the first POST
    first = screener(hf, store, client).run()
    assert first.counts["errors"] == 1
    failed = next(m for m in first.models if m.outcome == "error")
    assert failed.reason == "submit_failed" and "503" in (failed.detail or "")

    second = screener(hf, store, client).run()

    assert outcomes(second)[failed.model] == ("submitted", None)
    assert sum(1 for m in second.models if m.outcome == "submitted") == 1  # the others are not re-sent
    assert len(set(api_state.keys_posted())) == 3


def test_dry_run_submits_and_writes_nothing(hub, store) -> None:
    _, hf = hub
    summary = screener(hf, store, None).run()

    assert summary.dry_run and summary.counts["submitted"] == 0
    assert summary.skipped_by_reason["dry_run"] == 3
    assert list(store.list("screening/")) == []


def test_the_summary_is_written_to_the_bucket(hub, api, store) -> None:
    (_, hf), (_, client) = hub, api
    summary = screener(hf, store, client).run()

    runs = list(store.list("screening/runs/"))
    assert runs == [f"screening/runs/20260301T000000Z-{summary.run_id}.json"]
    assert store.get_json(runs[0]) == store.get_json(LATEST_KEY) == summary.model_dump(mode="json")
    assert summary.succeeded and summary.last_success_at == summary.finished_at == NOW


def test_cli_runs_one_pass_from_the_environment(hub, api, tmp_path, monkeypatch, capsys, caplog) -> None:
    (_, hf), (api_state, client) = hub, api
    watch_file = tmp_path / "watchlist.yaml"
    watch_file.write_text(yaml.safe_dump(WATCH))
    monkeypatch.setenv("DFC_STORE_URL", str(tmp_path / "cli-bucket"))
    monkeypatch.setenv("DFC_API_KEYS", f"{API_KEY},another-key-0123456789")
    caplog.set_level(logging.INFO, logger="service.screening.screen")

    code = main(
        [
            "--once",
            "--watch-list",
            str(watch_file),
            "--api-url",
            str(client.http.base_url),
            "--hf-endpoint",
            hf.endpoint,
        ]
    )

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["submitted"] == 3 == len(api_state.posts)  # sent with the first DFC_API_KEYS key
    assert LocalStore(tmp_path / "cli-bucket").get_json(LATEST_KEY)["run_id"] == printed["run_id"]
    logged = [r.getMessage() for r in caplog.records if r.name == "service.screening.screen"]
    assert f"screening run {printed['run_id']}: 9 seen, 3 submitted, 6 skipped" in logged[-1]
    assert "'not_causal_lm': 2" in logged[-1]


def test_cli_reports_an_invalid_watch_list_as_a_configuration_error(tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "watch.json"
    bad.write_text(json.dumps({"watch": [{"pattern": "*/anything", "reference": "trusted/base-8b"}]}))
    monkeypatch.setenv("DFC_STORE_URL", str(tmp_path / "bucket"))
    monkeypatch.setenv("DFC_API_KEYS", API_KEY)

    assert main(["--once", "--watch-list", str(bad)]) == 2
    assert "literal Hub name" in capsys.readouterr().err


def test_watch_list_rejects_overrides_that_are_not_a_valid_audit_spec(tmp_path) -> None:
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump({"watch": [{"org": "acme", "reference": "t/b", "spec": {"token_budget": 5}}]}))
    with pytest.raises(WatchListError, match="not a valid audit spec"):
        load_watch_list(path)


def test_watch_list_reads_sizes_and_durations() -> None:
    watch = WatchList.model_validate(
        {
            "defaults": {"max_parameters": "1.5T", "initial_since": "12h"},
            "watch": [{"org": "acme", "reference": "t/b", "max_parameters": "800M"}],
        }
    )
    entry = watch.watch[0]
    assert (entry.key, entry.author) == ("acme/*", "acme")
    assert watch.max_parameters(entry) == 800_000_000 and watch.defaults.max_parameters == 1_500_000_000_000
    assert watch.defaults.since(NOW) == NOW - dt.timedelta(hours=12)


def test_a_run_looks_at_no_more_than_max_models_per_entry(hub, api, store) -> None:
    (_, hf), (api_state, client) = hub, api
    bounded = WatchList.model_validate({**WATCH, "defaults": {**WATCH["defaults"], "max_models": 2}})
    summary = Screener(bounded, hf, store, client.submit, clock=lambda: NOW).run()

    acme = [m for m in summary.models if m.watch == "acme/*"]
    assert [m.model for m in acme] == ["acme/chat-7b", "acme/chat-1b", "acme/*"]
    assert (acme[-1].outcome, acme[-1].reason) == ("skipped", "max_models")
    assert len(api_state.posts) == 3


def test_submissions_are_accepted_by_the_real_api(hub, tmp_path) -> None:
    """The contract with service.api.app: the body is a valid AuditSpec, the key is accepted, the id comes back."""
    import uvicorn

    from service.api.app import create_app
    from tests.service.conftest import API_KEY as REAL_KEY
    from tests.service.conftest import FakeSubmitter, make_settings

    _, hf = hub
    submitter = FakeSubmitter()
    app = create_app(make_settings(tmp_path / "api-bucket"), submitter)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            thread.join(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = AuditClient(f"http://127.0.0.1:{port}", REAL_KEY, timeout_s=10)
        summary = screener(hf, LocalStore(tmp_path / "screen-bucket"), client).run()
        client.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)

    submitted = [m for m in summary.models if m.outcome == "submitted"]
    assert len(submitted) == 3 and summary.counts["errors"] == 0
    assert sorted(submitter.submitted) == sorted(m.audit_id for m in submitted)


def test_a_revision_claimed_by_a_live_run_is_left_to_it_and_a_stale_claim_is_taken_over(hub, api, store) -> None:
    (hub_state, hf), (api_state, client) = hub, api
    sha = hub_state.models["acme/chat-7b"]["sha"]
    claim = f"screening/claims/acme/chat-7b@{sha}.json"
    store.put_json(claim, {"state": "claimed", "run_id": "other", "at": NOW.isoformat(), "audit_id": None})

    first = screener(hf, store, client).run()

    assert outcomes(first)["acme/chat-7b"] == ("skipped", "in_progress")
    assert first.watermarks["acme/*"]["after"] is None  # looked at again next run, in case that run dies
    store.put_json(claim, {"state": "claimed", "run_id": "dead", "at": "2026-02-28T00:00:00+00:00", "audit_id": None})

    second = screener(hf, store, client).run()

    assert outcomes(second)["acme/chat-7b"] == ("submitted", None)
    assert api_state.keys_posted().count(f"screen:acme/chat-7b@{sha}") == 1
    assert store.get_json(claim)["state"] == "submitted"
