"""The two ways an audit reaches Ray: a task on a local Ray, or a job through the Ray Jobs API.

Most Jobs tests run Ray's real ``JobSubmissionClient`` against a small HTTP server that answers the four Jobs
API endpoints the way a Ray head does; one runs against a real head (``ray start --head``, skipped where Ray
cannot start one). The local tests start Ray in this process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from service.submission.base import SubmitError
from service.submission.drivers import DriverRecords, Owner
from service.submission.factory import make_submitter
from service.submission.local_ray import LocalRaySubmitter
from service.submission.orphans import RESTARTS_COUNTER, OrphanWatch
from service.submission.ray_jobs import RayJobsSubmitter
from tests.service.conftest import API_KEY, make_settings, spec_body
from tests.service.e2e_support import RayHead
from workers.analysis.llm import ExplainerSettings
from workers.pipeline.status import AuditState, AuditStatus, AuditStore
from workers.spec import AuditSpec
from workers.storage import LocalStore

SPEC = AuditSpec.model_validate({"model_a": {"id": "org/a"}, "model_b": {"id": "org/b"}, "token_budget": 1000})


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
    explainer = ExplainerSettings(url="http://vllm:8000/v1", model="Qwen/Qwen3-32B", api_key="sk-explainer-secret")
    settings = make_settings(
        store_dir, ray_address=address, trusted_models="org/custom", explainer=explainer,
        ray_job_runtime_env={"env_vars": {"HF_HOME": "/x"}},
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
        assert (env["DFC_EXPLAINER_URL"], env["DFC_EXPLAINER_MODEL"]) == ("http://vllm:8000/v1", "Qwen/Qwen3-32B")
        assert "sk-explainer-secret" not in json.dumps(job)

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


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def started_audit(audits: AuditStore) -> AuditStatus:
    """An audit a pipeline has started on (its state is a stage)."""
    status = audits.create(SPEC)
    return audits.update(status.id, state=AuditState.TRAINING, stage=AuditState.TRAINING, attempts=1)


def test_ray_jobs_reconcile_settles_audits_whose_job_is_over_or_lost(
    ray_head: tuple[str, type[FakeRayHead]], store_dir: Path
) -> None:
    address, head = ray_head
    audits = AuditStore(LocalStore(store_dir))
    submitter = RayJobsSubmitter(make_settings(store_dir, ray_address=address), address, audits=audits)

    def job(state: str, message: str = "") -> str:
        audit_id = started_audit(audits).id
        submitter.submit(audit_id)
        head.jobs[audit_id].update(status=state, message=message)
        return audit_id

    running = job("RUNNING")
    failed = job("FAILED", "Job entrypoint command failed with exit code 137")
    stopped = job("STOPPED", "Job was intentionally stopped.")
    cancelled = job("STOPPED")
    audits.request_cancel(cancelled)
    ended = job("SUCCEEDED")
    lost = job("RUNNING")
    del head.jobs[lost]  # the head restarted and forgot its jobs
    elsewhere = job("RUNNING")
    del head.jobs[elsewhere]
    records = DriverRecords(audits)
    moved = records.latest(elsewhere)
    assert moved is not None
    audits.store.put_json(records.key(elsewhere, 1), {**moved.model_dump(mode="json"), "address": "http://old:8265"})
    by_cli = started_audit(audits).id  # `dfc-audit run` on the same store: no job, no driver record

    done = OrphanWatch(audits, submitter).sweep()

    assert set(done) == {failed, stopped, cancelled, ended, lost}
    for untouched in (running, elsewhere, by_cli):
        assert audits.status(untouched).state is AuditState.TRAINING
    error = audits.status(failed).error
    assert error is not None and error.type == "RayJobFailed" and error.stage == "train"
    assert "exit code 137" in error.message and f"ray job logs {failed} --address {address}" in error.message
    assert audits.status(stopped).error.type == "RayJobStopped"  # type: ignore[union-attr]
    assert audits.status(cancelled).state is AuditState.CANCELLED
    assert audits.status(ended).error.type == "RayJobEnded"  # type: ignore[union-attr]
    assert all(audits.status(i).state is AuditState.FAILED for i in (failed, stopped, ended))
    assert lost in head.jobs, "a job the cluster lost is submitted again under the audit's id"
    assert audits.status(lost).counters[RESTARTS_COUNTER] == 1
    record = records.latest(lost)
    assert record is not None and record.generation == 2 and record.kind == "ray-job"


@pytest.fixture(scope="module")
def real_ray_head() -> Iterator[str]:
    head = RayHead()
    try:
        address = head.start()
    except (RuntimeError, OSError) as e:
        head.stop()
        pytest.skip(f"cannot start a Ray head here: {e}")
    try:
        yield address
    finally:
        head.stop()


@pytest.mark.slow
def test_ray_jobs_reconcile_against_a_real_ray_head(real_ray_head: str, store_dir: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    address, audits = real_ray_head, AuditStore(LocalStore(store_dir))
    settings = make_settings(store_dir, ray_address=address)
    failing = RayJobsSubmitter(
        settings, address, entrypoint=f"{sys.executable} -c 'import sys; sys.exit(3)'", audits=audits
    )
    sleeping = RayJobsSubmitter(settings, address, entrypoint="sleep 120", audits=audits)
    client = JobSubmissionClient(address)
    failed, stopped, cancelled = (started_audit(audits).id for _ in range(3))
    failing.submit(failed)
    sleeping.submit(stopped)
    sleeping.submit(cancelled)

    def job_state(audit_id: str) -> str:
        return str(client.get_job_info(audit_id).status)

    wait_until(lambda: job_state(failed) == "FAILED", 60, "the failing job never failed")
    wait_until(lambda: job_state(stopped) == job_state(cancelled) == "RUNNING", 60, "the jobs never ran")
    assert sleeping.reconcile(audits.status(stopped)) is None, "a running job's audit is left alone"
    client.stop_job(stopped)  # from the dashboard or the CLI: not through the API
    audits.request_cancel(cancelled)  # what DELETE /audits/{id} does
    sleeping.stop(cancelled)
    wait_until(lambda: job_state(stopped) == job_state(cancelled) == "STOPPED", 60, "the jobs never stopped")

    done = OrphanWatch(audits, sleeping).sweep()

    assert set(done) == {failed, stopped, cancelled}
    error = audits.status(failed).error
    assert error is not None and error.type == "RayJobFailed" and "exit code 3" in error.message
    assert audits.status(stopped).error.type == "RayJobStopped"  # type: ignore[union-attr]
    assert audits.status(cancelled).state is AuditState.CANCELLED


@pytest.mark.slow
def test_local_ray_runs_the_pipeline_as_a_task(store_dir: Path) -> None:
    settings: Settings = make_settings(store_dir, ray_max_retries=0)
    audits = AuditStore(LocalStore(store_dir))
    submitter = LocalRaySubmitter(settings, target="tests.service.stub_pipeline:run_audit", audits=audits)
    assert submitter.ready() == (True, "Ray (a local instance) is started or joined on the first audit")
    early = audits.create(SPEC).id
    # Requests run on worker threads that anyio retires when idle; Ray's processes die with the thread that
    # started them (PR_SET_PDEATHSIG), so Ray must not be started on the request's thread.
    starter = threading.Thread(target=submitter.submit, args=(early,))
    starter.start()
    starter.join()
    try:
        with TestClient(create_app(settings, submitter), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            audit_id = c.post("/audits", json=spec_body()).json()["id"]
            for done in (audit_id, early):
                wait_until(
                    lambda done=done: c.get(f"/audits/{done}").json()["state"] == "succeeded",
                    90,
                    "the Ray task never finished the audit",
                )
            assert submitter.ready() == (True, "Ray is running")

            # A worker that dies without a word (OOM killer) leaves no final state: the submitter writes one.
            crashing = LocalRaySubmitter(settings, target="tests.service.stub_pipeline:crash_worker", audits=audits)
            lost = started_audit(audits).id
            crashing.submit(lost)
            wait_until(lambda: audits.status(lost).state is AuditState.FAILED, 60, "the dead task's audit stayed")
            crashing.close()
            error = audits.status(lost).error
            assert error is not None and error.type == "RayTaskFailed" and error.stage == "train"
        seen = audits.store.get_json(audits.key(audit_id, "stub-run.json"))
        assert seen["env_store_url"] == str(store_dir), "the task got the pipeline's settings in its environment"
        record = DriverRecords(audits).latest(audit_id)
        assert record is not None and record.kind == "local-ray" and record.owner == Owner.current()
    finally:
        submitter.close()
