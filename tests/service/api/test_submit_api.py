"""POST /audits: a new audit is stored and handed to Ray exactly once, however often or concurrently it is asked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.service.conftest import API_KEY, FakeSubmitter, make_settings, spec_body
from workers.pipeline.status import AuditState, AuditStore
from workers.spec import AuditSpec
from workers.storage import LocalStore


def _records(store_dir: Path) -> AuditStore:
    return AuditStore(LocalStore(store_dir))


def test_submit_creates_a_queued_audit_and_hands_it_to_ray(
    client: TestClient, submitter: FakeSubmitter, store_dir: Path
) -> None:
    r = client.post("/audits", json=spec_body())
    assert r.status_code == 202
    record = r.json()
    assert r.headers["Location"] == f"/audits/{record['id']}"
    assert record["state"] == "queued"
    assert record["spec"]["model_b"]["id"] == "Qwen/Qwen3-8B"
    assert record["spec"]["crosscoder"]["architecture"] == "dfc", "defaults are filled in and echoed"
    assert submitter.submitted == [record["id"]]
    stored = _records(store_dir)
    assert list(stored.ids()) == [record["id"]]
    assert stored.spec(record["id"]) == AuditSpec.model_validate(spec_body())
    fetched = client.get(r.headers["Location"]).json()
    # AuditStore.create returns the status it built, stamped a moment before the copy it stored.
    assert {**fetched, "updated_at": None} == {**record, "updated_at": None}


def test_same_idempotency_key_twice_is_one_audit(client: TestClient, submitter: FakeSubmitter) -> None:
    first = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "job-42"})
    second = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "job-42"})
    assert (first.status_code, second.status_code) == (202, 200)
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["Location"] == first.headers["Location"]
    assert first.json()["idempotency_key"] == "job-42"
    assert len(submitter.submitted) == 1


def test_idempotency_key_reused_with_another_spec_is_a_conflict(client: TestClient) -> None:
    client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "k1"})
    r = client.post("/audits", json=spec_body(seed=7), headers={"Idempotency-Key": "k1"})
    assert r.status_code == 409
    assert "different spec" in r.json()["detail"]


def test_concurrent_posts_with_one_key_make_exactly_one_audit(
    client: TestClient, submitter: FakeSubmitter, store_dir: Path
) -> None:
    def post(_: int) -> tuple[int, str]:
        r = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "burst"})
        return r.status_code, r.json()["id"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(post, range(20)))
    statuses = sorted(code for code, _ in results)
    assert statuses == [200] * 19 + [202], "one request creates, the others get the winner's record"
    assert len({audit_id for _, audit_id in results}) == 1
    assert len(list(_records(store_dir).ids())) == 1
    assert len(submitter.submitted) == 1


def test_concurrent_posts_of_one_spec_without_key_make_exactly_one_audit(
    client: TestClient, submitter: FakeSubmitter, store_dir: Path
) -> None:
    with ThreadPoolExecutor(max_workers=10) as pool:
        ids = set(pool.map(lambda _: client.post("/audits", json=spec_body()).json()["id"], range(10)))
    assert len(ids) == 1
    assert len(list(_records(store_dir).ids())) == 1
    assert len(submitter.submitted) == 1


def test_concurrent_posts_on_s3_make_exactly_one_audit(s3_server, tmp_path: Path) -> None:
    """The same race on a real S3 server, where put_if_absent is an If-None-Match conditional PUT."""
    settings = make_settings(
        f"s3://{s3_server.bucket}/api-{tmp_path.name}",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    submitter = FakeSubmitter()
    with TestClient(create_app(settings, submitter), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(
                pool.map(lambda _: c.post("/audits", json=spec_body(), headers={"Idempotency-Key": "s3"}), range(20))
            )
        assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
        assert len({r.json()["id"] for r in responses}) == 1
        assert len(c.get("/audits").json()["items"]) == 1
    assert len(submitter.submitted) == 1


def test_same_spec_without_key_returns_the_unfinished_audit(
    client: TestClient, submitter: FakeSubmitter, store_dir: Path
) -> None:
    first = client.post("/audits", json=spec_body()).json()
    again = client.post("/audits", json=spec_body())
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert client.post("/audits", json=spec_body(seed=1)).status_code == 202, "another spec is another audit"
    _records(store_dir).update(first["id"], state=AuditState.SUCCEEDED)
    rerun = client.post("/audits", json=spec_body())
    assert rerun.status_code == 202 and rerun.json()["id"] != first["id"], "a finished audit is not reused"
    assert client.post("/audits", json=spec_body()).json()["id"] == rerun.json()["id"]
    assert len(submitter.submitted) == 3


def test_keyless_post_finds_an_unfinished_audit_made_with_a_key(client: TestClient) -> None:
    keyed = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "cron-1"}).json()
    r = client.post("/audits", json=spec_body())
    assert r.status_code == 200 and r.json()["id"] == keyed["id"]


def test_a_new_key_starts_a_deliberate_rerun_of_the_same_spec(client: TestClient, submitter: FakeSubmitter) -> None:
    a = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "run-a"}).json()
    b = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "run-b"}).json()
    assert a["id"] != b["id"] and len(submitter.submitted) == 2


def test_failed_hand_off_to_ray_is_503_and_a_retry_with_the_key_starts_afresh(
    client: TestClient, submitter: FakeSubmitter, store_dir: Path
) -> None:
    submitter.fail_with = "cluster at http://ray:8265 unreachable"
    r = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "retry-me"})
    assert r.status_code == 503
    assert "unreachable" in r.json()["detail"] and "DFC_RAY_ADDRESS" in r.json()["hint"]
    (failed_id,) = _records(store_dir).ids()
    failed = _records(store_dir).status(failed_id)
    assert failed.state is AuditState.FAILED and failed.error is not None
    assert failed.error.type == "SubmitError"
    submitter.fail_with = None
    retry = client.post("/audits", json=spec_body(), headers={"Idempotency-Key": "retry-me"})
    assert retry.status_code == 202 and retry.json()["id"] != failed_id
    assert submitter.submitted == [retry.json()["id"]]
