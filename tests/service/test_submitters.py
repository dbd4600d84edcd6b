"""The two ways an audit reaches Ray: a task on a local Ray, or a job through the Ray Jobs API.

The Jobs test runs Ray's real ``JobSubmissionClient`` against a small HTTP server that answers the
four Jobs API endpoints the way a Ray head does (no cluster can run here); the local test starts Ray.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.submit import LocalRaySubmitter, RayJobsSubmitter, SubmitError, make_submitter
from tests.service.conftest import API_KEY, make_settings, spec_body
from workers.status import AuditStore
from workers.storage import LocalStore


class FakeRayHead(BaseHTTPRequestHandler):
    """The Jobs API of a Ray head: version, submit (unique submission ids), job info, stop."""

    jobs: dict[str, dict[str, Any]]
    requests: list[tuple[str, str]]

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path))
        if self.path == "/api/version":
            self._reply(200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "fake", "session_name": "s"})
        elif self.path.startswith("/api/jobs/") and self.path.removeprefix("/api/jobs/") in self.jobs:
            self._reply(200, self.jobs[self.path.removeprefix("/api/jobs/")])
        else:
            self._reply(404, "Job does not exist")

    def do_POST(self) -> None:
        self.requests.append(("POST", self.path))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/api/jobs/":
            sid = body["submission_id"]
            if sid in self.jobs:
                self._reply(400, f"Job with submission_id {sid} already exists. Please use a different submission_id.")
                return
            self.jobs[sid] = {"type": "SUBMISSION", "status": "PENDING", "submission_id": sid, **body}
            self._reply(200, {"job_id": sid, "submission_id": sid})
        elif self.path.endswith("/stop") and self.path.split("/")[3] in self.jobs:
            self.jobs[self.path.split("/")[3]]["status"] = "STOPPED"
            self._reply(200, {"stopped": True})
        else:
            self._reply(404, "Job does not exist")


@pytest.fixture
def ray_head() -> Iterator[tuple[str, type[FakeRayHead]]]:
    handler = type("Head", (FakeRayHead,), {"jobs": {}, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_ray_jobs_submitter_submits_once_per_audit_and_stops_on_cancel(
    ray_head: tuple[str, type[FakeRayHead]], store_dir: Path
) -> None:
    address, head = ray_head
    settings = make_settings(
        store_dir, ray_address=address, trusted_models="org/custom", ray_job_runtime_env={"env_vars": {"HF_HOME": "/x"}}
    )
    submitter = make_submitter(settings)
    assert isinstance(submitter, RayJobsSubmitter)
    assert submitter.ready() == (True, f"Ray Jobs API (version 4) at {address}")
    with TestClient(create_app(settings, submitter), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        audit_id = c.post("/audits", json=spec_body()).json()["id"]
        job = head.jobs[audit_id]
        assert job["entrypoint"] == f"dfc-audit run-audit {audit_id}"
        assert job["metadata"]["audit_id"] == audit_id
        env = job["runtime_env"]["env_vars"]
        assert env["DFC_STORE_URL"] == str(store_dir) and env["DFC_TRUSTED_MODELS"] == "org/custom"
        assert env["HF_HOME"] == "/x", "DFC_RAY_JOB_RUNTIME_ENV is merged in"
        assert not any("KEY" in name for name in env), "no secrets in a job's runtime_env"

        submitter.submit(audit_id)  # a resubmission finds the job and changes nothing
        assert len(head.jobs) == 1

        assert c.delete(f"/audits/{audit_id}").status_code == 202
        assert head.jobs[audit_id]["status"] == "STOPPED"


def test_ray_jobs_submitter_reports_an_unreachable_cluster(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ray_address="http://127.0.0.1:9")
    submitter = RayJobsSubmitter(settings, settings.ray_address)
    ok, reason = submitter.ready()
    assert not ok and "127.0.0.1:9" in reason
    with pytest.raises(SubmitError, match="cannot reach the Ray Jobs API"):
        submitter.submit("20990101-000000-deadbeef")
    submitter.stop("20990101-000000-deadbeef")  # best effort: logs, never raises


def test_ray_jobs_refusal_is_a_submit_error(ray_head: tuple[str, type[FakeRayHead]], tmp_path: Path) -> None:
    address, head = ray_head
    settings = make_settings(tmp_path, ray_job_runtime_env={"working_dir": "/definitely/not/here"})
    with pytest.raises(SubmitError, match="refused"):
        RayJobsSubmitter(settings, address).submit("20990101-000000-deadbeef")
    assert head.jobs == {}


@pytest.mark.parametrize(
    ("address", "kind"),
    [("", LocalRaySubmitter), ("auto", LocalRaySubmitter), ("http://head:8265", RayJobsSubmitter)],
)
def test_ray_address_chooses_the_submitter(tmp_path: Path, address: str, kind: type) -> None:
    assert isinstance(make_submitter(make_settings(tmp_path, ray_address=address)), kind)


@pytest.mark.slow
def test_local_ray_runs_the_pipeline_as_a_task(store_dir: Path) -> None:
    settings: Settings = make_settings(store_dir)
    submitter = LocalRaySubmitter(settings, target="tests.service.stub_pipeline:run_audit")
    assert submitter.ready() == (True, "Ray (a local instance) is started or joined on the first audit")
    try:
        with TestClient(create_app(settings, submitter), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            audit_id = c.post("/audits", json=spec_body()).json()["id"]
            deadline = time.monotonic() + 90
            while c.get(f"/audits/{audit_id}").json()["state"] != "succeeded":
                assert time.monotonic() < deadline, "the Ray task never finished the audit"
                time.sleep(0.2)
            assert submitter.ready() == (True, "Ray is running")
        seen = LocalStore(store_dir).get_json(AuditStore(LocalStore(store_dir)).key(audit_id, "stub-run.json"))
        assert seen["env_store_url"] == str(store_dir), "the task got the pipeline's settings in its environment"
    finally:
        submitter.close()
