"""The embedded default: each audit runs as a Ray task on a Ray this API process starts (or joins as a driver).

This process is the audit's driver, and the task dies with it. So the submitter records itself in the audit's
driver record (service/submission/drivers.py), renews the record while the task runs, marks the audit failed if the task
ends without finishing it, and :meth:`LocalRaySubmitter.reconcile` resumes audits whose driving process is
gone: the pipeline skips every stage whose manifest exists, so a resumed audit continues where it stopped.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any

from service.settings import Settings
from service.submission.base import PIPELINE, StoreBacked, SubmitError
from service.submission.drivers import DriverRecord
from service.submission.orphans import close_audit, count_restart
from workers.pipeline.status import AuditState, AuditStatus, AuditStore
from workers.storage import StorageError

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
"""How often the running tasks are polled (a task that ended is settled within this)."""


def _run_pipeline(target: str, audit_id: str, store_url: str, store_settings: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task: import the pipeline where it runs (a Ray worker), never in the API process."""
    module, _, name = target.partition(":")
    run_audit = getattr(importlib.import_module(module), name)
    status = run_audit(audit_id, store_url, store_settings)
    return status.model_dump(mode="json") if hasattr(status, "model_dump") else dict(status)


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps what the task raised
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or ['no message'])[0]}"


class LocalRaySubmitter(StoreBacked):
    """Runs each audit as a Ray task on a Ray started by this process (or a cluster joined as a driver)."""

    def __init__(
        self, settings: Settings, address: str | None = None, target: str = PIPELINE, audits: AuditStore | None = None
    ) -> None:
        super().__init__(settings, audits)
        self.address, self.target = address or None, target
        self._lock = threading.Lock()
        self._remote: Any = None
        self._started_ray = False
        self._inflight: dict[str, tuple[Any, DriverRecord]] = {}
        self._closing, self._release_ray = threading.Event(), threading.Event()
        self._owner: threading.Thread | None = None
        self._watcher: threading.Thread | None = None

    def _start_ray(self) -> None:
        """``ray.init`` on a thread of its own that lives until :meth:`close`.

        Ray starts its GCS and raylet with PR_SET_PDEATHSIG, which fires when the *thread* that started them
        ends. Started from a request's worker thread (anyio retires idle ones after 10 s), the whole Ray and
        every audit on it would be killed while the API runs on. The same signal ends them when this process
        dies, even by SIGKILL, so a crashed API leaves no Ray behind to keep running its audits.
        """
        import ray

        started = threading.Event()
        failure: list[BaseException] = []

        def own() -> None:
            try:
                ray.init(address=self.address or "local", include_dashboard=False)
            except BaseException as e:
                failure.append(e)
                return
            finally:
                started.set()
            self._release_ray.wait()
            ray.shutdown()

        self._release_ray.clear()
        self._owner = threading.Thread(target=own, name="ray-owner", daemon=True)
        self._owner.start()
        started.wait()
        if failure:
            raise failure[0]

    def _task(self) -> Any:
        """The remote function, after starting or joining Ray on first use."""
        with self._lock:
            if self._remote is None:
                import ray

                if not ray.is_initialized():
                    log.info("starting Ray (%s)", self.address or "local instance in the API process")
                    # "local" starts a fresh instance: never join someone else's `ray start` by accident.
                    self._start_ray()
                    self._started_ray = True
                # num_cpus=0: the driver task mostly waits on the stage actors, and reserving a CPU for it
                # could leave a small machine without one for the extraction actors it starts.
                self._remote = ray.remote(num_cpus=0, max_retries=self.settings.ray_max_retries)(_run_pipeline)
                self._closing.clear()
                self._watcher = threading.Thread(target=self._watch, name="ray-audit-watch", daemon=True)
                self._watcher.start()
            return self._remote

    def submit(self, audit_id: str) -> None:
        self._submit(audit_id, reason="submitted", after=0)

    def _submit(self, audit_id: str, *, reason: str, after: int) -> bool:
        """Claim driver generation ``after + 1`` and start the task; False when another submission holds it."""
        try:
            task = self._task()
            record = self.records.claim(
                audit_id, kind="local-ray", address=self.address or "local", session=self.session,
                reason=reason, after=after,
            )  # fmt: skip
        except Exception as e:  # ray raises many unrelated types on start-up failures
            raise SubmitError(f"local Ray did not accept audit {audit_id}: {e}") from e
        if record is None:
            log.info("audit %s: driver generation %d exists; not started again", audit_id, after + 1)
            return False
        if after:
            try:
                count_restart(self.audits, audit_id)  # before the pipeline starts: it keeps the counters it finds
            except (StorageError, KeyError) as e:
                log.warning("audit %s: restart not counted: %s", audit_id, e)
        try:
            ref = self._launch(task, audit_id)
        except Exception as e:
            self._release([record])  # nobody runs it: the next orphan check may try again
            raise SubmitError(f"local Ray did not accept audit {audit_id}: {e}") from e
        with self._lock:
            self._inflight[audit_id] = (ref, record)
        return True

    def _launch(self, task: Any, audit_id: str) -> Any:
        # A worker dying (OOM, node loss) is retried; an exception from the pipeline is its own verdict,
        # already written to status.json, so it is not.
        return task.options(
            name=f"audit-{audit_id}",
            retry_exceptions=False,
            runtime_env={"env_vars": self.settings.job_env()},
        ).remote(self.target, audit_id, self.settings.store_url, self.settings.store_settings())

    def reconcile(self, status: AuditStatus) -> str | None:
        """Resume the audit if an API's local Ray drove it and that API process is gone."""
        record = self.records.latest(status.id)
        if record is None or record.kind != "local-ray":
            return None  # run by the CLI, or submitted as a Ray job: not a local driver's to judge
        if (record.session == self.session and not record.released) or not record.driver_gone(
            self.settings.driver_lease_s
        ):
            return None
        who = f"{record.owner.host} pid {record.owner.pid}"
        if self.audits.cancel_requested(status.id):
            close_audit(self.audits, status.id, AuditState.CANCELLED, "", "")
            return f"cancelled: its driver ({who}) is gone and cancellation had been requested"
        if not self._submit(status.id, reason=f"resumed: driver {who} gone", after=record.generation):
            return None
        return f"resumed in {status.state.value}: its driver ({who}) is gone; finished stages are reused"

    def _watch(self) -> None:
        """Renew the driver records of running tasks; settle the tasks that ended."""
        import ray

        renewed = time.monotonic()
        while not self._closing.wait(WATCH_INTERVAL_S):
            with self._lock:
                inflight = dict(self._inflight)
            if not inflight:
                continue
            try:
                refs = [ref for ref, _ in inflight.values()]
                ready = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
            except Exception as e:
                log.warning("cannot poll the audits' Ray tasks: %s", e)
                continue
            for audit_id, (ref, _) in inflight.items():
                if ref in ready:
                    self._settle(audit_id, ref)
            if time.monotonic() - renewed >= self.settings.driver_lease_s / 3:
                renewed = time.monotonic()
                for audit_id, (ref, record) in inflight.items():
                    if ref not in ready:
                        self._renew(audit_id, ref, record)

    def _renew(self, audit_id: str, ref: Any, record: DriverRecord) -> None:
        try:
            record = self.records.renew(record)
        except StorageError as e:
            log.warning("audit %s: driver record not renewed: %s", audit_id, e)
            return
        with self._lock:
            if audit_id in self._inflight:
                self._inflight[audit_id] = (ref, record)

    def _settle(self, audit_id: str, ref: Any) -> None:
        """A task ended: if it died without writing a final state (worker lost beyond its retries), write one."""
        import ray

        with self._lock:
            self._inflight.pop(audit_id, None)
        try:
            ray.get(ref, timeout=0)
            return
        except Exception as e:
            failure = e
        try:
            if not self.audits.status(audit_id).state.finished:
                message = f"its Ray task ended without finishing it ({_first_line(failure)}); submit the audit again"
                close_audit(self.audits, audit_id, AuditState.FAILED, "RayTaskFailed", message)
        except (StorageError, KeyError) as e:
            log.warning("audit %s: outcome of its failed Ray task not recorded: %s", audit_id, e)

    def _release(self, records: list[DriverRecord]) -> None:
        for record in records:
            try:
                self.records.renew(record, released=True)
            except StorageError as e:
                log.warning("audit %s: driver record not released: %s", record.audit_id, e)

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
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join(10)
        with self._lock:
            records = [record for _, record in self._inflight.values()]
            self._inflight.clear()
        # Only a Ray this submitter started is shut down; one the process already had is not ours.
        if self._started_ray and self._owner is not None:
            self._release_ray.set()
            self._owner.join(60)
            # Their tasks died with this Ray: say so, so that another API resumes them without a lease wait.
            self._release(records)
        self._remote, self._started_ray, self._owner, self._watcher = None, False, None, None
