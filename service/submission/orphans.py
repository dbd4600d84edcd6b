"""Unfinished audits whose driver is gone: found when the API starts (and every DFC_ORPHAN_CHECK_S), then settled.

What "settled" means is the submitter's call (:meth:`Reconciler.reconcile`): the local-Ray submitter resumes an
audit whose driving API process died (the pipeline skips the stages whose manifests exist); the Ray Jobs
submitter asks the cluster and closes an audit whose job failed or was stopped. Audits no API submitted
(``dfc-audit run`` on the same store) have no driver record and are never touched.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol, runtime_checkable

from workers.pipeline.status import AuditError, AuditState, AuditStatus, AuditStore, now

log = logging.getLogger(__name__)

STAGE_NAMES = {
    AuditState.EXTRACTING: "extract",
    AuditState.ALIGNING: "align",
    AuditState.TRAINING: "train",
    AuditState.ANALYSING: "analyse",
    AuditState.STEERING: "steer",
    AuditState.SCANNING: "scan",
    AuditState.EXPLAINING: "explain",
    AuditState.PUBLISHING: "publish",
}
"""The pipeline's stage names (error.stage, manifests) by state, as workers/pipeline/run.py writes them."""
RESTARTS_COUNTER = "driver_restarts"
"""status.json counter: how often an API resumed the audit after its driver was lost."""


@runtime_checkable
class Reconciler(Protocol):
    """A submitter that can tell whether an unfinished audit still has a driver, and settle it if not."""

    def reconcile(self, status: AuditStatus) -> str | None:
        """Settle ``status``'s audit if its driver is gone; say what was done (None: nothing to do)."""
        ...


def close_audit(audits: AuditStore, audit_id: str, state: AuditState, error_type: str, message: str) -> AuditStatus:
    """Write a final state for an audit whose driver is gone (so no pipeline will write one)."""
    status = audits.status(audit_id)
    if state is AuditState.CANCELLED:
        return audits.update(audit_id, state=state, finished_at=now())
    stage = STAGE_NAMES.get(status.stage) if status.stage else None
    error = AuditError(stage=stage, type=error_type, message=message)
    return audits.update(audit_id, state=state, finished_at=now(), error=error)


def count_restart(audits: AuditStore, audit_id: str) -> AuditStatus:
    """Add one to the audit's ``driver_restarts`` counter (the pipeline keeps counters it finds)."""
    status = audits.status(audit_id)
    counters = {**status.counters, RESTARTS_COUNTER: status.counters.get(RESTARTS_COUNTER, 0.0) + 1}
    return audits.update(audit_id, counters=counters)


class OrphanWatch:
    """Sweeps the store for unfinished audits and hands each to the submitter's ``reconcile``."""

    def __init__(self, audits: AuditStore, reconciler: Reconciler, interval_s: float = 0.0) -> None:
        self.audits, self.reconciler, self.interval_s = audits, reconciler, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweeps = 0

    def sweep(self) -> dict[str, str]:
        """One pass over every audit; returns what was done, by audit id. Never raises."""
        done: dict[str, str] = {}
        try:
            ids = list(self.audits.ids())
        except Exception as e:  # the store may be down right now; the next sweep tries again
            log.warning("orphan check: cannot list audits: %s", e)
            return done
        for audit_id in ids:
            if self._stop.is_set():
                break
            try:
                status = self.audits.status(audit_id)
                if status.state.finished:
                    continue
                action = self.reconciler.reconcile(status)
            except Exception as e:
                log.warning("orphan check: audit %s: %s: %s", audit_id, type(e).__name__, e)
                continue
            if action:
                log.warning("audit %s: %s", audit_id, action)
                done[audit_id] = action
        self.sweeps += 1
        return done

    def _run(self) -> None:
        self.sweep()
        while self.interval_s > 0 and not self._stop.wait(self.interval_s):
            self.sweep()

    def start(self) -> None:
        """Sweep now, in the background (the API answers meanwhile), then every ``interval_s`` (0: once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="orphan-watch", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
