"""Reading audits back: one record, pages of them, cancellation, reports — all from the store alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, FakeSubmitter, spec_body
from workers.pipeline.status import AuditError, AuditState, AuditStore
from workers.report.fixtures import example_report
from workers.storage import LocalStore


@pytest.fixture
def records(store_dir: Path) -> AuditStore:
    return AuditStore(LocalStore(store_dir))


def _submit(client: TestClient, seed: int) -> str:
    r = client.post("/audits", json=spec_body(seed=seed))
    assert r.status_code == 202
    return r.json()["id"]


def _publish(records: AuditStore, audit_id: str, *, html: bool) -> None:
    """What the pipeline's publish stage leaves behind: the report objects, then the succeeded status."""
    report = example_report(n_features=12, n_shared=20)
    json_key = records.key(audit_id, "report/report.json")
    records.store.put_bytes(json_key, report.model_dump_json().encode())
    html_key = None
    if html:
        html_key = records.key(audit_id, "report/report.html")
        records.store.put_bytes(html_key, b"<!doctype html><title>published page</title>")
    records.update(audit_id, state=AuditState.SUCCEEDED, progress=1.0, report_json=json_key, report_html=html_key)


def test_unknown_audit_is_404_with_a_hint(client: TestClient) -> None:
    r = client.get("/audits/20990101-000000-deadbeef")
    assert r.status_code == 404
    assert r.json()["hint"]


def test_list_is_newest_first_filtered_by_state_and_paginated(client: TestClient, records: AuditStore) -> None:
    ids = [_submit(client, seed) for seed in range(5)]
    newest_first = sorted(ids, reverse=True)
    records.update(ids[1], state=AuditState.TRAINING)
    records.update(ids[3], state=AuditState.TRAINING)

    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/audits", params=params).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first

    training = client.get("/audits", params={"state": "training"}).json()
    assert [item["id"] for item in training["items"]] == sorted([ids[1], ids[3]], reverse=True)
    assert training["next_cursor"] is None
    assert client.get("/audits", params={"state": "succeeded"}).json() == {"items": [], "next_cursor": None}


def test_page_size_is_bounded_by_the_settings(client: TestClient, settings: Settings) -> None:
    r = client.get("/audits", params={"limit": settings.page_size_max + 1})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "limit"]
    assert client.get("/audits", params={"state": "sleeping"}).status_code == 422


def test_cancelling_a_queued_audit_cancels_it_at_once(
    client: TestClient, submitter: FakeSubmitter, records: AuditStore
) -> None:
    audit_id = _submit(client, 0)
    r = client.delete(f"/audits/{audit_id}")
    assert r.status_code == 202
    assert r.json()["state"] == "cancelled"
    assert records.cancel_requested(audit_id)
    assert submitter.stopped == [audit_id]
    assert client.delete(f"/audits/{audit_id}").status_code == 200, "cancelling twice is harmless"


def test_cancelling_a_running_audit_leaves_it_to_the_pipeline(client: TestClient, records: AuditStore) -> None:
    audit_id = _submit(client, 0)
    records.update(audit_id, state=AuditState.EXTRACTING, attempts=1)
    r = client.delete(f"/audits/{audit_id}")
    assert r.status_code == 202
    assert r.json()["state"] == "extracting", "the pipeline writes the final state when it notices"
    assert records.cancel_requested(audit_id)


def test_a_finished_audit_cannot_be_cancelled(client: TestClient, records: AuditStore) -> None:
    audit_id = _submit(client, 0)
    records.update(audit_id, state=AuditState.SUCCEEDED)
    r = client.delete(f"/audits/{audit_id}")
    assert r.status_code == 409
    assert "succeeded" in r.json()["detail"]
    assert not records.cancel_requested(audit_id)


def test_report_is_409_until_the_audit_succeeds_then_served(client: TestClient, records: AuditStore) -> None:
    audit_id = _submit(client, 0)
    records.update(audit_id, state=AuditState.TRAINING, progress=0.5)
    for path in ("report", "report.html", "report/url"):
        r = client.get(f"/audits/{audit_id}/{path}")
        assert r.status_code == 409, path
        assert "training (50% done)" in r.json()["detail"]
        assert r.json()["hint"].startswith(f"poll GET /audits/{audit_id}")

    _publish(records, audit_id, html=False)
    report = client.get(f"/audits/{audit_id}/report")
    assert report.status_code == 200
    assert report.json() == example_report(n_features=12, n_shared=20).model_dump(mode="json")
    page = client.get(f"/audits/{audit_id}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower(), "rendered from report.json when no page was published"
    urls = client.get(f"/audits/{audit_id}/report/url").json()
    assert urls["json_url"].endswith(f"{audit_id}/report/report.json") and urls["html_url"] is None


def test_published_html_page_is_served_as_is(client: TestClient, records: AuditStore) -> None:
    audit_id = _submit(client, 0)
    _publish(records, audit_id, html=True)
    assert "published page" in client.get(f"/audits/{audit_id}/report.html").text
    assert client.get(f"/audits/{audit_id}/report/url").json()["html_url"].endswith("report.html")


def test_failed_audit_report_says_why(client: TestClient, records: AuditStore) -> None:
    audit_id = _submit(client, 0)
    error = AuditError(stage="extracting", type="OutOfMemoryError", message="GPU 0 full")
    records.update(audit_id, state=AuditState.FAILED, error=error)
    r = client.get(f"/audits/{audit_id}/report")
    assert r.status_code == 409 and "GPU 0 full" in r.json()["detail"]


def test_presigned_report_url_on_s3_fetches_the_report(s3_server, tmp_path: Path) -> None:
    import httpx

    from tests.service.conftest import make_settings

    settings = make_settings(
        f"s3://{s3_server.bucket}/urls-{tmp_path.name}",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    app = create_app(settings, FakeSubmitter())
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        audit_id = _submit(c, 0)
        _publish(AuditStore(app.state.store), audit_id, html=True)
        urls = c.get(f"/audits/{audit_id}/report/url").json()
    fetched = httpx.get(urls["json_url"], timeout=10)
    assert fetched.status_code == 200 and fetched.json()["schema_version"]
    assert httpx.get(urls["html_url"], timeout=10).text.startswith("<!doctype html>")


def test_a_second_app_on_the_same_store_sees_every_audit(
    client: TestClient, settings: Settings, records: AuditStore
) -> None:
    ids = [_submit(client, seed) for seed in range(3)]
    _publish(records, ids[0], html=False)
    other = FakeSubmitter()
    with TestClient(create_app(settings, other), headers={"Authorization": f"Bearer {API_KEY}"}) as second:
        assert {item["id"] for item in second.get("/audits").json()["items"]} == set(ids)
        assert second.get(f"/audits/{ids[0]}/report").status_code == 200
        again = second.post("/audits", json=spec_body(seed=1))
        assert again.status_code == 200 and again.json()["id"] == ids[1], "idempotency lives in the store too"
        assert second.delete(f"/audits/{ids[2]}").json()["state"] == "cancelled"
    assert other.submitted == []
    assert client.get(f"/audits/{ids[2]}").json()["state"] == "cancelled"
