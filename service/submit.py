"""Handing an audit to Ray: in the API process (embedded default) or to a cluster through the Ray Jobs API.

A submitter only starts work; everything about an audit (spec, status, cancellation) is in the store,
so a submitter keeps no state of its own and any API instance can submit, poll or cancel any audit.
Ray is imported lazily: an API that never submits (tests, a read-only replica) never loads it.
"""

from __future__ import annotations

import importlib
import logging
import shlex
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from service.settings import Settings

log = logging.getLogger(__name__)

PIPELINE = "workers.pipeline:run_audit"
"""The function that runs a whole audit: ``run_audit(audit_id, store_url, store_settings) -> AuditStatus``."""
ENTRYPOINT = "dfc-audit run-audit {audit_id}"
"""The Ray Jobs entrypoint: the CLI runs the same pipeline as a job driver on the cluster."""


class SubmitError(Exception):
    """Ray did not take the audit; the message says what to check."""


@runtime_checkable
class Submitter(Protocol):
    """Starts and stops audits on some Ray; the store holds everything else."""

    def submit(self, audit_id: str) -> None:
        """Start running the (already stored) audit; submitting the same id twice must not start it twice."""
        ...

    def stop(self, audit_id: str) -> None:
        """Best-effort stop after cancellation was recorded in the store (the pipeline also checks it)."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Whether audits can be submitted now, and a reason a person can read."""
        ...

    def close(self) -> None:
        """Release connections (called when the app shuts down)."""
        ...


def _run_pipeline(target: str, audit_id: str, store_url: str, store_settings: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task: import the pipeline where it runs (a Ray worker), never in the API process."""
    module, _, name = target.partition(":")
    run_audit = getattr(importlib.import_module(module), name)
    status = run_audit(audit_id, store_url, store_settings)
    return status.model_dump(mode="json") if hasattr(status, "model_dump") else dict(status)


class LocalRaySubmitter:
    """Runs each audit as a Ray task on a Ray started in this process (or a cluster joined as a driver)."""

    def __init__(self, settings: Settings, address: str | None = None, target: str = PIPELINE) -> None:
        self.settings, self.address, self.target = settings, address or None, target
        self._lock = threading.Lock()
        self._remote: Any = None
        self._started_ray = False

    def _task(self) -> Any:
        """The remote function, after starting or joining Ray on first use."""
        with self._lock:
            if self._remote is None:
                import ray

                if not ray.is_initialized():
                    log.info("starting Ray (%s)", self.address or "local instance in the API process")
                    # "local" starts a fresh instance: never join someone else's `ray start` by accident.
                    ray.init(address=self.address or "local", include_dashboard=False)
                    self._started_ray = True
                # num_cpus=0: the driver task mostly waits on the stage actors, and reserving a CPU for it
                # could leave a small machine without one for the extraction actors it starts.
                self._remote = ray.remote(num_cpus=0, max_retries=self.settings.ray_max_retries)(_run_pipeline)
            return self._remote

    def submit(self, audit_id: str) -> None:
        try:
            task = self._task()
            # A worker dying (OOM, node loss) is retried; an exception from the pipeline is its own verdict,
            # already written to status.json, so it is not.
            task.options(
                name=f"audit-{audit_id}",
                retry_exceptions=False,
                runtime_env={"env_vars": self.settings.job_env()},
            ).remote(self.target, audit_id, self.settings.store_url, self.settings.store_settings())
        except Exception as e:  # ray raises many unrelated types on start-up failures
            raise SubmitError(f"local Ray did not accept audit {audit_id}: {e}") from e

    def stop(self, audit_id: str) -> None:
        # Cancellation is cooperative: the pipeline polls cancel.json between batches and stops cleanly,
        # which a task kill would not (half-written shards, leaked GPU memory in actors).
        log.info("audit %s: cancellation recorded; the local pipeline stops at its next check", audit_id)

    def ready(self) -> tuple[bool, str]:
        if self._remote is None:
            where = self.address or "a local instance"
            return True, f"Ray ({where}) is started or joined on the first audit"
        import ray

        return (True, "Ray is running") if ray.is_initialized() else (False, "Ray was shut down")

    def close(self) -> None:
        # Only a Ray this submitter started is shut down; one the process already had is not ours.
        if self._started_ray:
            import ray

            ray.shutdown()
        self._remote, self._started_ray = None, False


class JobClient(Protocol):
    """The part of ``ray.job_submission.JobSubmissionClient`` this module uses."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = ..., **kwargs: Any) -> str: ...
    def stop_job(self, job_id: str) -> bool: ...
    def get_job_info(self, job_id: str) -> Any: ...
    def get_version(self) -> str: ...


def _ray_job_client(address: str) -> JobClient:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


class RayJobsSubmitter:
    """Submits each audit as a Ray job (submission id = audit id) to a cluster's dashboard address."""

    def __init__(
        self,
        settings: Settings,
        address: str,
        client_factory: Callable[[str], JobClient] = _ray_job_client,
        entrypoint: str = ENTRYPOINT,
    ) -> None:
        self.settings, self.address, self.entrypoint = settings, address, entrypoint
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

    @staticmethod
    def _job_exists(client: JobClient, audit_id: str) -> bool:
        try:
            client.get_job_info(audit_id)
            return True
        except Exception:
            return False

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


def make_submitter(settings: Settings) -> Submitter:
    """The submitter DFC_RAY_ADDRESS asks for: Jobs API for http(s)://, local or joined Ray otherwise."""
    address = settings.ray_address.strip()
    if address.startswith(("http://", "https://")):
        return RayJobsSubmitter(settings, address)
    return LocalRaySubmitter(settings, address or None)
