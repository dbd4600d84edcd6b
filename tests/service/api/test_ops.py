"""Probes, metrics and the weight of the API process."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY, FakeSubmitter, make_settings, spec_body
from workers.analysis.llm import ExplainerSettings
from workers.pipeline.status import AuditState, AuditStore
from workers.storage import LocalStore


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_healthz_and_readyz_on_a_working_store(anonymous: TestClient) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").json() == {"ready": True, "checks": {"storage": "ok", "submitter": "ok"}}


def test_readyz_is_503_with_the_reason_when_s3_is_unreachable(tmp_path: Path) -> None:
    settings = make_settings(
        "s3://audits/prefix",
        s3_endpoint_url=f"http://127.0.0.1:{_unused_port()}",
        s3_access_key="nobody",
        s3_secret_key="nothing-secret-here",
        s3_connect_timeout_s=1,
        s3_max_attempts=1,
    )
    with TestClient(create_app(settings, FakeSubmitter())) as c:
        start = time.monotonic()
        r = c.get("/readyz")
        assert time.monotonic() - start < 10, "a dead store must not hang the probe"
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False and body["checks"]["submitter"] == "ok"
        assert "StorageUnreachable" in body["checks"]["storage"]
        assert c.get("/healthz").status_code == 200, "liveness does not depend on the store"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        for r in (c.get("/audits", headers=auth), c.post("/audits", json=spec_body(), headers=auth)):
            assert r.status_code == 503 and "DFC_STORE_URL" in r.json()["hint"]
            assert r.headers["Retry-After"]
            assert "nothing-secret-here" not in r.text
        assert c.get("/metrics").status_code == 200 and "dfc_store_up 0.0" in c.get("/metrics").text


def test_readyz_is_503_when_ray_is_not_available(anonymous: TestClient, submitter: FakeSubmitter) -> None:
    submitter.readiness = (False, "Ray Jobs API at http://ray:8265 unreachable")
    r = anonymous.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"] == {"storage": "ok", "submitter": "Ray Jobs API at http://ray:8265 unreachable"}


def test_metrics_count_requests_and_audits(client: TestClient, store_dir: Path) -> None:
    ids = [client.post("/audits", json=spec_body(seed=s)).json()["id"] for s in range(3)]
    client.post("/audits", json=spec_body(seed=0))  # an idempotent replay is not a new submission
    client.get(f"/audits/{ids[0]}")
    client.delete(f"/audits/{ids[2]}")
    records = AuditStore(LocalStore(store_dir))
    records.update(
        ids[0],
        state=AuditState.SUCCEEDED,
        stage_seconds={"extracting": 42.0, "training": 700.0},
        counters={"tokens_extracted_a": 1000, "tokens_extracted_b": 1200, "training_step": 50},
    )
    records.update(ids[1], state=AuditState.TRAINING, progress=0.5, counters={"training_step": 7})

    samples = _samples(client.get("/metrics").text)
    assert samples[("dfc_audits_submitted_total", ())] == 3
    assert samples[("dfc_audit_cancel_requests_total", ())] == 1
    route = (("method", "GET"), ("route", "/audits/{audit_id}"), ("status", "200"))
    assert samples[("dfc_http_requests_total", route)] == 1
    assert samples[("dfc_http_request_duration_seconds_count", route)] == 1
    assert samples[("dfc_http_requests_total", (("method", "POST"), ("route", "/audits"), ("status", "200")))] == 1
    assert samples[("dfc_audits", (("state", "succeeded"),))] == 1
    assert samples[("dfc_audits", (("state", "training"),))] == 1
    assert samples[("dfc_audits", (("state", "cancelled"),))] == 1
    assert samples[("dfc_audits", (("state", "queued"),))] == 0
    assert samples[("dfc_audits_finished_total", (("state", "cancelled"),))] == 1
    assert samples[("dfc_audit_progress", (("audit_id", ids[1]), ("state", "training")))] == 0.5
    assert samples[("dfc_tokens_extracted_total", ())] == 2200
    assert samples[("dfc_training_steps_total", ())] == 57
    assert samples[("dfc_audit_stage_duration_seconds_count", (("stage", "training"),))] == 1
    assert samples[("dfc_audit_stage_duration_seconds_bucket", (("le", "600.0"), ("stage", "training")))] == 0
    assert samples[("dfc_audit_stage_duration_seconds_bucket", (("le", "1800.0"), ("stage", "training")))] == 1
    assert samples[("dfc_store_up", ())] == 1


def test_each_app_has_its_own_registry(settings, submitter: FakeSubmitter) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with (
        TestClient(create_app(settings, submitter), headers=auth) as a,
        TestClient(create_app(settings, submitter)) as b,
    ):
        a.post("/audits", json=spec_body())
        assert _samples(b.get("/metrics").text).get(("dfc_audits_submitted_total", ())) == 0
        assert _samples(a.get("/metrics").text)[("dfc_audits_submitted_total", ())] == 1


def test_importing_the_app_loads_neither_torch_nor_ray() -> None:
    code = (
        "import sys, service.api.app, service.submission.base\n"
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'dfc') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"service.api.app imported {out.stdout.strip()}"


def test_every_setting_and_metric_is_documented(client: TestClient, store_dir: Path) -> None:
    docs = Path(__file__).resolve().parents[3] / "service"
    settings_doc = (docs / "SETTINGS.md").read_text()
    names = [n for n in Settings.model_fields if n != "explainer"]
    names += [f"explainer_{n}" for n in ExplainerSettings.model_fields]
    for name in names:
        assert f"`DFC_{name.upper()}`" in settings_doc, f"DFC_{name.upper()} is not in SETTINGS.md"
    client.post("/audits", json=spec_body())
    exposed = {family.name for family in text_string_to_metric_families(client.get("/metrics").text)}
    metrics_doc = (docs / "METRICS.md").read_text()
    documented = set(re.findall(r"^\| `(dfc_\w+)`", metrics_doc, flags=re.MULTILINE))
    # The parser names counters without their _total suffix.
    assert {name.removesuffix("_total") for name in documented} == exposed
