"""Finding audits whose driver is gone, and resuming them, without Ray: the decisions, not the Ray task.

The local submitter here records what it would start instead of starting Ray;
tests/service/submission/test_submitters.py runs the real thing, and tests/service/test_end_to_end.py crashes a
served API mid-audit.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings
from service.submission.drivers import DriverRecord, DriverRecords, Owner, boot_id, process_start
from service.submission.local_ray import LocalRaySubmitter
from service.submission.orphans import RESTARTS_COUNTER, OrphanWatch
from tests.service.conftest import FakeSubmitter, make_settings
from workers.pipeline.status import AuditState, AuditStatus, AuditStore, now
from workers.spec import AuditSpec
from workers.storage import LocalStore

SPEC = AuditSpec.model_validate({"model_a": {"id": "org/a"}, "model_b": {"id": "org/b"}, "token_budget": 1000})


class RecordingSubmitter(LocalRaySubmitter):
    """The local-Ray submitter with Ray left out: ``launched`` lists the audits it would have started."""

    def __init__(self, settings: Settings, audits: AuditStore) -> None:
        super().__init__(settings, audits=audits)
        self.launched: list[str] = []

    def _task(self) -> Any:
        return None

    def _launch(self, task: Any, audit_id: str) -> Any:
        self.launched.append(audit_id)
        return object()


@pytest.fixture
def audits(tmp_path: Path) -> AuditStore:
    return AuditStore(LocalStore(tmp_path / "bucket"))


@pytest.fixture(scope="module")
def dead_owner() -> Owner:
    """A process of this machine that has exited (its pid and start time, read while it ran)."""
    child = subprocess.Popen(["sleep", "30"])
    start = process_start(child.pid)
    child.kill()
    child.wait()
    return Owner(host=socket.gethostname(), boot_id=boot_id(), pid=child.pid, pid_start=start)


def audit(audits: AuditStore, state: AuditState, **changes: Any) -> AuditStatus:
    status = audits.create(SPEC)
    return audits.update(status.id, state=state, attempts=0 if state is AuditState.QUEUED else 1, **changes)


def drive(audits: AuditStore, status: AuditStatus, owner: Owner, **fields: Any) -> DriverRecord:
    """Record ``owner`` as the audit's driver (generation 1), as a submitting API would."""
    record = DriverRecord(
        audit_id=status.id, generation=1, kind="local-ray", address="local", session="an-earlier-api", owner=owner
    ).model_copy(update=fields)
    audits.store.put_json(DriverRecords(audits).key(status.id, 1), record.model_dump(mode="json"))
    return record


def test_an_owner_is_alive_while_its_process_runs(dead_owner: Owner) -> None:
    assert Owner.current().alive_here() is True
    assert dead_owner.alive_here() is False
    reused = Owner.current().model_copy(update={"pid_start": (Owner.current().pid_start or 0) + 1})
    assert reused.alive_here() is False, "same pid, another start time: a reused process id"
    rebooted = Owner.current().model_copy(update={"boot_id": "another-boot"})
    assert rebooted.alive_here() is False
    assert Owner(host="elsewhere", pid=os.getpid()).alive_here() is None, "another host cannot be asked"


def test_a_driver_on_another_host_is_gone_when_its_lease_runs_out() -> None:
    fresh = DriverRecord(
        audit_id="x", generation=1, kind="local-ray", address="local", session="s", owner=Owner(host="elsewhere", pid=1)
    )
    assert not fresh.driver_gone(lease_s=60)
    assert fresh.driver_gone(lease_s=60, at=now() + dt.timedelta(seconds=61))
    assert fresh.model_copy(update={"released": True}).driver_gone(lease_s=60)


def test_a_generation_is_claimed_once(audits: AuditStore) -> None:
    records = DriverRecords(audits)
    first = records.claim("a1", kind="local-ray", address="local", session="s1", reason="submitted")
    assert first is not None and first.generation == 1
    assert records.claim("a1", kind="local-ray", address="local", session="s2", reason="submitted") is None
    second = records.claim("a1", kind="local-ray", address="local", session="s2", reason="resumed", after=1)
    assert second is not None and records.latest("a1") == second
    assert records.latest("no-such-audit") is None


def test_the_sweep_resumes_only_orphans(audits: AuditStore, dead_owner: Owner, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "bucket")
    submitter = RecordingSubmitter(settings, audits)
    orphan = audit(audits, AuditState.TRAINING, counters={"training_step": 7.0})
    drive(audits, orphan, dead_owner)
    queued_orphan = audit(audits, AuditState.QUEUED)  # its driver died before Ray started the task
    drive(audits, queued_orphan, dead_owner)
    finished = audit(audits, AuditState.SUCCEEDED)
    drive(audits, finished, dead_owner)
    live = audit(audits, AuditState.EXTRACTING)
    drive(audits, live, Owner.current())  # another API process on this machine, still running
    by_cli = audit(audits, AuditState.ALIGNING)  # `dfc-audit run` or --stop-after: no API drives it
    cancelled = audit(audits, AuditState.ANALYSING)
    drive(audits, cancelled, dead_owner)
    audits.request_cancel(cancelled.id)
    remote = audit(audits, AuditState.TRAINING)
    drive(audits, remote, Owner(host="elsewhere", pid=1))  # lease fresh: that API may well be alive
    expired = audit(audits, AuditState.TRAINING)
    drive(audits, expired, Owner(host="elsewhere", pid=1), renewed_at=now() - dt.timedelta(hours=1))
    as_job = audit(audits, AuditState.TRAINING)
    drive(audits, as_job, dead_owner, kind="ray-job")

    done = OrphanWatch(audits, submitter).sweep()

    assert sorted(submitter.launched) == sorted([orphan.id, queued_orphan.id, expired.id])
    assert set(done) == {orphan.id, queued_orphan.id, expired.id, cancelled.id}
    assert done[orphan.id].startswith("resumed in training")
    assert audits.status(cancelled.id).state is AuditState.CANCELLED
    for untouched in (finished, live, by_cli, remote, as_job):
        assert audits.status(untouched.id).state is untouched.state
    resumed = audits.status(orphan.id)
    assert resumed.state is AuditState.TRAINING, "the pipeline, not the API, moves it on"
    assert resumed.counters == {"training_step": 7.0, RESTARTS_COUNTER: 1.0}
    record = DriverRecords(audits).latest(orphan.id)
    assert record is not None and record.generation == 2 and record.session == submitter.session
    assert record.owner == Owner.current() and record.reason.startswith("resumed")

    # The next sweep of the same API finds its own live driver: nothing is started twice.
    assert OrphanWatch(audits, submitter).sweep() == {}
    assert len(submitter.launched) == 3


def test_two_apis_sweeping_at_once_resume_an_orphan_once(audits: AuditStore, dead_owner: Owner, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "bucket")
    first, second = RecordingSubmitter(settings, audits), RecordingSubmitter(settings, audits)
    orphan = audit(audits, AuditState.EXTRACTING)
    drive(audits, orphan, dead_owner)
    assert first.reconcile(audits.status(orphan.id)) is not None
    assert second.reconcile(audits.status(orphan.id)) is None
    assert first.launched == [orphan.id] and second.launched == []


def test_the_app_sweeps_at_start_when_asked(audits: AuditStore, dead_owner: Owner, tmp_path: Path) -> None:
    orphan = audit(audits, AuditState.TRAINING)
    drive(audits, orphan, dead_owner)
    store = tmp_path / "bucket"
    off = create_app(make_settings(store, resume_orphans=False), RecordingSubmitter(make_settings(store), audits))
    assert off.state.orphan_watch is None
    assert create_app(make_settings(store), FakeSubmitter()).state.orphan_watch is None, "no reconcile: no watch"

    submitter = RecordingSubmitter(make_settings(store), audits)
    app = create_app(make_settings(store, orphan_check_s=0), submitter)
    with TestClient(app):
        deadline = time.monotonic() + 10
        while app.state.orphan_watch.sweeps == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert submitter.launched == [orphan.id]


def test_an_api_that_stops_cleanly_releases_its_audits_at_once(audits: AuditStore, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "bucket")
    stopping = RecordingSubmitter(settings, audits)
    running = audit(audits, AuditState.TRAINING)
    stopping.submit(running.id)
    successor = RecordingSubmitter(settings, audits)
    assert successor.reconcile(audits.status(running.id)) is None, "its driver (this very process) is alive"
    # As if it had started Ray: close() stops that Ray (and the audit's task with it), then lets go of the audit.
    stopping._started_ray, stopping._owner = True, threading.Thread(target=lambda: None)
    stopping._owner.start()
    stopping.close()
    record = DriverRecords(audits).latest(running.id)
    assert record is not None and record.released
    assert successor.reconcile(audits.status(running.id)) is not None
    assert successor.launched == [running.id]
