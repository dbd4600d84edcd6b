"""End to end through HTTP: ``dfc-audit serve`` in a child process, its embedded local Ray, the real S3 server.

The served app reads only DFC_* variables: the store is a prefix of the SeaweedFS bucket of the ``s3_server``
fixture, DFC_RAY_ADDRESS is empty (a local Ray inside the API process) and local model paths are allowed so
the tiny Llama and Qwen3 checkpoints of ``tiny_models`` can be audited. The tests run in file order on one
module-scoped server: a full audit; a crash (SIGKILL) of the API in the middle of a second audit, after which
a new API process resumes it from its last finished stage; a cancellation.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.service.conftest import API_KEY
from tests.service.e2e_support import RAY_AGENTS, ServedApi, metric_value, wait_for_audit
from workers.report.schema import AuditReport

pytestmark = pytest.mark.slow

FINISHED = {"succeeded", "failed", "cancelled"}
RUNNING = {"extracting", "aligning", "training", "analysing", "steering", "scanning", "explaining", "publishing"}
AUDIT_TIMEOUT_S = 180.0
CRASH_STEPS = 400
"""Training steps of the audit crashed in training: enough to be caught there, few enough to finish soon after."""


def spec(tiny_models: Any, *, steps: int = 30, seed: int = 0) -> dict[str, Any]:
    """A tiny audit of Qwen3 against Llama (the values of tests/workers/analysis/test_analyse.py, less steering)."""
    return {
        "model_a": {"id": str(tiny_models["llama"])},
        "model_b": {"id": str(tiny_models["qwen3"])},
        "corpus": {"kind": "builtin"},
        "token_budget": 4000,
        "max_length": 128,
        "crosscoder": {"architecture": "dfc", "n_features": 256, "k": 8, "a_only": 0.1, "b_only": 0.1},
        "training": {"steps": steps, "batch_size": 128, "lr": 3e-3, "checkpoint_every": 0},
        "steering": {"enabled": True, "top_n": 1, "alphas": [-4.0, 4.0],
                     "probe_prompts": ["The capital of France is"], "max_new_tokens": 2},
        "top_features": 3,
        "seed": seed,
    }  # fmt: skip


def long_spec(tiny_models: Any, seed: int) -> dict[str, Any]:
    """An audit that trains far longer than a test waits, so it is still running when the test acts on it."""
    return spec(tiny_models, steps=1_000_000, seed=seed)


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"e2e-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def served(s3_server, tiny_models, prefix, tmp_path_factory) -> Iterator[ServedApi]:
    """``dfc-audit serve`` on a fresh prefix of the test bucket; killed (with its Ray) at the end."""
    tiny_models["llama"], tiny_models["qwen3"]  # build them here, before the server's clock starts
    env = {name: value for name, value in os.environ.items() if not name.startswith("DFC_")}
    env.update({
        "DFC_STORE_URL": f"s3://{s3_server.bucket}/{prefix}",
        "DFC_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "DFC_S3_REGION": s3_server.region,
        "DFC_S3_ACCESS_KEY": s3_server.access_key,
        "DFC_S3_SECRET_KEY": s3_server.secret_key,
        "DFC_API_KEYS": API_KEY,
        "DFC_ALLOW_LOCAL_PATHS": "true",
        "DFC_RAY_ADDRESS": "",
        "DFC_METRICS_CACHE_S": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "RAY_DEDUP_LOGS": "0",
    })  # fmt: skip
    api = ServedApi(env, tmp_path_factory.mktemp("e2e-logs"), API_KEY)
    api.start()
    try:
        yield api
    finally:
        api.kill()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A plain boto3 client of the test bucket: what a user reading reports straight from S3 has."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
    )


def submit(client, body: dict[str, Any]) -> str:
    response = client.post("/audits", json=body)
    assert response.status_code == 202, response.text
    audit_id = response.json()["id"]
    assert response.headers["Location"] == f"/audits/{audit_id}"
    return audit_id


def test_an_audit_submitted_over_http_succeeds_and_its_report_is_served_and_in_the_bucket(
    served, tiny_models, bucket, s3_server, prefix
):
    with served.client() as client:
        audit_id = submit(client, spec(tiny_models))
        record = wait_for_audit(client, audit_id, lambda r: r["state"] in FINISHED, AUDIT_TIMEOUT_S, served)
        assert record["state"] == "succeeded", f"error: {record['error']}\n{served.log_tail()}"
        assert record["error"] is None and record["progress"] == pytest.approx(1.0)
        assert record["report_json"] == f"audits/{audit_id}/report/report.json"

        response = client.get(f"/audits/{audit_id}/report")
        assert response.status_code == 200, response.text
        report = AuditReport.model_validate(response.json())
        assert report.audit_id == audit_id
        assert report.model_a.architecture == "LlamaForCausalLM"
        assert report.model_b.architecture == "Qwen3ForCausalLM"
        assert report.features_a and report.features_b

        html = client.get(f"/audits/{audit_id}/report.html")
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert "<html" in html.text.lower()

        # The same report straight from the bucket, where the status says it is (relative to the store prefix).
        stored = bucket.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{record['report_json']}")
        from_bucket = AuditReport.model_validate_json(stored["Body"].read())
        assert from_bucket == report
        if record["report_html"]:
            page = bucket.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{record['report_html']}")
            assert page["Body"].read().decode() == html.text

        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert (metric_value(metrics.text, "dfc_audits_submitted_total") or 0) >= 1
        succeeded = max(
            metric_value(metrics.text, "dfc_audits", 'state="succeeded"') or 0,
            metric_value(metrics.text, "dfc_audits_finished_total", 'state="succeeded"') or 0,
        )
        assert succeeded >= 1, metrics.text


def test_an_audit_resumes_where_it_stopped_after_the_api_crashes(served, tiny_models, bucket, s3_server, prefix):
    def stored(name: str) -> dict[str, Any]:
        return json.loads(
            bucket.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/audits/{audit_id}/{name}")["Body"].read()
        )

    with served.client() as client:
        audit_id = submit(client, spec(tiny_models, steps=CRASH_STEPS, seed=2))
        record = wait_for_audit(
            client, audit_id, lambda r: r["state"] in FINISHED | {"training"}, AUDIT_TIMEOUT_S, served
        )
        assert record["state"] == "training", f"the audit was to be crashed in training: {record['state']}"
        assert record["attempts"] == 1
    finished_before = {stage: stored(f"stages/{stage}.json") for stage in ("extract", "align")}

    # A crash of the API process alone (OOM killer, kill -9): Ray's core processes die with the thread that
    # started them, and the audit's task with them; only Ray's two per-node agents linger (and exit by themselves).
    survivors = served.crash()
    assert all(command.startswith(RAY_AGENTS) for command in survivors), survivors
    assert stored("status.json")["state"] == "training", "nothing ran the audit on after the crash"

    served.start()  # a new process on the same store finds the orphan at start-up and resumes it
    with served.client() as client:
        record = wait_for_audit(client, audit_id, lambda r: r["state"] in FINISHED, AUDIT_TIMEOUT_S, served)
        assert record["state"] == "succeeded", f"error: {record['error']}\n{served.log_tail()}"
        assert record["attempts"] == 2 and record["counters"]["driver_restarts"] == 1
        assert client.get(f"/audits/{audit_id}/report").status_code == 200
    # The stages finished before the crash were skipped, not redone: their manifests are the ones written then.
    assert {stage: stored(f"stages/{stage}.json") for stage in finished_before} == finished_before
    assert stored("driver/000002.json")["reason"].startswith("resumed")
    assert "resumed in training" in served.log_tail(100_000)


def test_a_running_audit_is_cancelled_over_http(served, tiny_models):
    with served.client() as client:
        audit_id = submit(client, long_spec(tiny_models, seed=3))
        record = wait_for_audit(client, audit_id, lambda r: r["state"] in RUNNING | FINISHED, AUDIT_TIMEOUT_S, served)
        assert record["state"] in RUNNING, f"finished before it could be cancelled: {record['state']}"
        response = client.delete(f"/audits/{audit_id}")
        assert response.status_code == 202, response.text
        record = wait_for_audit(client, audit_id, lambda r: r["state"] in FINISHED, 60.0, served)
        assert record["state"] == "cancelled", f"error: {record['error']}"
        assert client.get(f"/audits/{audit_id}/report").status_code == 409
        again = client.delete(f"/audits/{audit_id}")
        assert again.status_code == 200 and again.json()["state"] == "cancelled"
