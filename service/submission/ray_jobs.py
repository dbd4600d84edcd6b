"""A real deployment: each audit is a Ray job (submission id = audit id) on a cluster's Jobs API.

The job's driver runs on the cluster, so an API restart orphans nothing; what can go wrong is the job itself
dying without recording an outcome (driver OOM-killed, node lost, stopped from the dashboard), which leaves
status.json in a running state forever. :meth:`RayJobsSubmitter.reconcile` asks the cluster about each
unfinished audit and settles it:

- job PENDING or RUNNING: nothing to do;
- job FAILED (or SUCCEEDED without a final status): ``failed``, with the job's message and where its log is.
  Not resubmitted: the driver died on the cluster for a reason a person should read (a deterministic OOM would
  otherwise crash-loop), and Ray refuses to reuse the submission id anyway;
- job STOPPED: ``cancelled`` if cancellation was requested (stopping the job is how a cancel reaches a
  running pipeline), else ``failed`` ("stopped outside this API");
- no such job although an API submitted it to this same address (the head restarted without GCS fault
  tolerance and forgot its jobs): submitted again under the same id, so it resumes from its manifests.
  Audits with no driver record (run by the CLI) or sent to another address are left alone: that other
  cluster may still be running them.
"""

from __future__ import annotations

import logging
import shlex
import threading
from collections.abc import Callable
from typing import Any, Protocol

from service.settings import Settings
from service.submission.base import ENTRYPOINT, StoreBacked, SubmitError
from service.submission.drivers import DriverRecord
from service.submission.orphans import close_audit, count_restart
from workers.pipeline.status import AuditState, AuditStatus, AuditStore
from workers.storage import StorageError

log = logging.getLogger(__name__)


class JobClient(Protocol):
    """The part of ``ray.job_submission.JobSubmissionClient`` this module uses."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = ..., **kwargs: Any) -> str: ...
    def stop_job(self, job_id: str) -> bool: ...
    def get_job_info(self, job_id: str) -> Any: ...
    def get_version(self) -> str: ...


def _ray_job_client(address: str) -> JobClient:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _missing(exc: Exception) -> bool:
    """Whether the Jobs API answered that the job does not exist (not: could not be asked)."""
    return "status code 404" in str(exc)


class RayJobsSubmitter(StoreBacked):
    """Submits each audit as a Ray job (submission id = audit id) to a cluster's dashboard address."""

    def __init__(
        self,
        settings: Settings,
        address: str,
        client_factory: Callable[[str], JobClient] = _ray_job_client,
        entrypoint: str = ENTRYPOINT,
        audits: AuditStore | None = None,
    ) -> None:
        super().__init__(settings, audits)
        self.address, self.entrypoint = address, entrypoint
        self._factory = client_factory
        self._client: JobClient | None = None
        self._lock = threading.Lock()

    def _connect(self) -> JobClient:
        # Constructing the client already calls the cluster (version check), so it is made on first use
        # and reused; it is a connection, not audit state.
        with self._lock:
            if self._client is None:
                self._client = self._factory(self.address)
            return self._client

    def runtime_env(self) -> dict[str, Any]:
        """The job's runtime_env: DFC_RAY_JOB_RUNTIME_ENV plus the pipeline's non-secret settings."""
        env = dict(self.settings.ray_job_runtime_env)
        env["env_vars"] = {**env.get("env_vars", {}), **self.settings.job_env()}
        return env

    def submit(self, audit_id: str) -> None:
        self._submit_job(audit_id)
        self._record(audit_id, reason="submitted", after=0)

    def _submit_job(self, audit_id: str) -> None:
        try:
            client = self._connect()
        except Exception as e:
            raise SubmitError(f"cannot reach the Ray Jobs API at {self.address}: {e}") from e
        try:
            client.submit_job(
                entrypoint=self.entrypoint.format(audit_id=shlex.quote(audit_id)),
                submission_id=audit_id,
                runtime_env=self.runtime_env(),
                metadata={"audit_id": audit_id},
            )
            log.info("audit %s: submitted as a Ray job to %s", audit_id, self.address)
        except Exception as e:
            # The cluster refuses a reused submission id; if the job is there, an earlier submit won.
            if self._job_exists(client, audit_id):
                log.info("audit %s: Ray job already exists; not submitted again", audit_id)
                return
            raise SubmitError(f"Ray at {self.address} refused audit {audit_id}: {e}") from e

    def _record(self, audit_id: str, *, reason: str, after: int) -> DriverRecord | None:
        """Record where the job went (best effort: the job runs either way; without it, a lost job stays lost)."""
        try:
            return self.records.claim(
                audit_id, kind="ray-job", address=self.address, session=self.session, reason=reason, after=after
            )
        except StorageError as e:
            log.warning("audit %s: driver record not written: %s", audit_id, e)
            return None

    @staticmethod
    def _job_exists(client: JobClient, audit_id: str) -> bool:
        try:
            client.get_job_info(audit_id)
            return True
        except Exception:
            return False

    def reconcile(self, status: AuditStatus) -> str | None:
        """Settle an unfinished audit whose Ray job is over or lost (see the module docstring)."""
        client = self._connect()  # unreachable: raises, and the next check tries again
        try:
            info = client.get_job_info(status.id)
        except Exception as e:
            if not _missing(e):
                raise
            return self._resubmit_lost(status)
        job_state = str(getattr(info, "status", "")).upper()
        if job_state in ("PENDING", "RUNNING") or self.audits.status(status.id).state.finished:
            return None  # running, or the pipeline wrote its outcome as the job ended
        where = f"Ray job {status.id} at {self.address}"
        logs = f"`ray job logs {status.id} --address {self.address}`"
        said = (str(getattr(info, "message", "") or "").strip().splitlines() or ["no message"])[0]
        if job_state == "STOPPED" and self.audits.cancel_requested(status.id):
            close_audit(self.audits, status.id, AuditState.CANCELLED, "", "")
            return f"cancelled: {where} was stopped after cancellation was requested"
        if job_state == "FAILED":
            kind, message = "RayJobFailed", f"{where} failed without recording an outcome ({said}); read {logs}"
        elif job_state == "STOPPED":
            kind, message = "RayJobStopped", f"{where} was stopped outside this API ({said})"
        else:
            kind, message = "RayJobEnded", f"{where} ended ({job_state}) without finishing the audit; read {logs}"
        close_audit(self.audits, status.id, AuditState.FAILED, kind, f"{message}; then submit the audit again")
        return f"failed: {where} is {job_state}"

    def _resubmit_lost(self, status: AuditStatus) -> str | None:
        record = self.records.latest(status.id)
        if record is None or record.kind != "ray-job":
            return None  # run by the CLI, or by a local Ray: not a job this cluster should know
        if record.address != self.address:
            log.info("audit %s: its Ray job went to %s, not %s; left alone", status.id, record.address, self.address)
            return None
        if self.audits.cancel_requested(status.id):
            close_audit(self.audits, status.id, AuditState.CANCELLED, "", "")
            return f"cancelled: the Ray cluster at {self.address} lost its job and cancellation had been requested"
        if self._record(status.id, reason="resubmitted: job lost by the cluster", after=record.generation) is None:
            return None  # another API instance resubmits it
        try:
            count_restart(self.audits, status.id)
        except (StorageError, KeyError) as e:
            log.warning("audit %s: restart not counted: %s", status.id, e)
        self._submit_job(status.id)
        return f"resubmitted: the Ray cluster at {self.address} had no job for it; finished stages are reused"

    def stop(self, audit_id: str) -> None:
        try:
            self._connect().stop_job(audit_id)
        except Exception as e:
            # The record already says "cancel"; a job that is gone or unreachable has nothing to stop.
            log.warning("audit %s: could not stop its Ray job (%s); the pipeline still sees the request", audit_id, e)

    def ready(self) -> tuple[bool, str]:
        try:
            version = self._connect().get_version()
        except Exception as e:
            with self._lock:
                self._client = None  # reconnect on the next call, the cluster may be back
            return False, f"Ray Jobs API at {self.address} unreachable: {e}"
        return True, f"Ray Jobs API (version {version}) at {self.address}"

    def close(self) -> None:
        self._client = None
