"""What the audit routes do, apart from HTTP: submit idempotently, read, list, cancel.

Everything is read from and written to the store on each call, so any number of API instances on the
same bucket behave as one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from service.api.errors import ApiError
from service.api.idempotency import IdempotencyIndex, KeyReused
from service.api.schemas import AuditPage, AuditRecord
from service.submission.base import SubmitError, Submitter
from workers.pipeline.status import AuditError, AuditState, AuditStatus, AuditStore, new_audit_id, now
from workers.spec import AuditSpec
from workers.storage import StorageError

log = logging.getLogger(__name__)

CREATE_WAIT_S = 10.0
"""How long a request that lost the race waits for the winner's status.json to appear."""
MAX_CHAIN = 10_000
"""Finished audits of one spec a keyless POST walks past before giving up (a safety bound, never reached)."""


class Submission(NamedTuple):
    """The audit a POST refers to, and whether this request created it (202) or found it (200)."""

    record: AuditRecord
    created: bool


class Cancellation(NamedTuple):
    """The audit after a DELETE, and whether cancellation was newly requested (202) or already done (200)."""

    record: AuditRecord
    requested: bool


class AuditService:
    """Submission, lookup, listing and cancellation of audits over one store and one submitter."""

    def __init__(
        self,
        audits: AuditStore,
        submitter: Submitter,
        *,
        on_created: Callable[[AuditStatus], None] = lambda status: None,
        on_cancel_requested: Callable[[AuditStatus], None] = lambda status: None,
    ) -> None:
        self.audits, self.submitter = audits, submitter
        self.index = IdempotencyIndex(audits.store)
        self._on_created, self._on_cancel_requested = on_created, on_cancel_requested

    # -- submission -----------------------------------------------------------------------------------

    def submit(self, spec: AuditSpec, idempotency_key: str | None = None) -> Submission:
        """Create and start the audit ``spec`` describes, or return the one this request already means."""
        fingerprint = spec.fingerprint()
        if idempotency_key is not None:
            slot = self.index.key_slot(idempotency_key)
            try:
                claim = self.index.claim(slot, fingerprint, new_audit_id())
            except KeyReused as e:
                raise ApiError(409, str(e), "use a new Idempotency-Key for a different spec") from None
            submission = self._materialise(claim.audit_id, spec, idempotency_key, slot)
            if submission.created:
                self._register_fingerprint(submission.record)
            return submission
        slot = self.index.spec_slot(fingerprint)
        for _ in range(MAX_CHAIN):
            claim = self.index.claim(slot, fingerprint, new_audit_id())
            submission = self._materialise(claim.audit_id, spec, None, None)
            if submission.created or not submission.record.state.finished:
                return submission
            slot = self.index.spec_slot(fingerprint, after=claim.audit_id)
        raise ApiError(503, f"more than {MAX_CHAIN} finished audits of this spec", "submit with an Idempotency-Key")

    def _materialise(self, audit_id: str, spec: AuditSpec, key: str | None, key_slot: str | None) -> Submission:
        """Return audit ``audit_id``, creating and submitting it if nobody has yet (spec.json decides who)."""
        try:
            return Submission(AuditRecord.of(self.audits.status(audit_id), spec), created=False)
        except KeyError:
            pass
        try:
            status = self.audits.create(spec, idempotency_key=key, audit_id=audit_id)
        except FileExistsError:
            # Another request is creating it right now; its status.json follows its spec.json at once.
            return Submission(AuditRecord.of(self._await_status(audit_id), spec), created=False)
        self._dispatch(status, key_slot)
        self._on_created(status)
        log.info("audit %s: created (%s vs %s)", audit_id, spec.model_a.id, spec.model_b.id)
        return Submission(AuditRecord.of(status, spec), created=True)

    def _await_status(self, audit_id: str) -> AuditStatus:
        deadline = time.monotonic() + CREATE_WAIT_S
        while True:
            try:
                return self.audits.status(audit_id)
            except KeyError:
                if time.monotonic() > deadline:
                    raise ApiError(
                        503, f"audit {audit_id} is still being created by another request", "retry in a few seconds"
                    ) from None
                time.sleep(0.05)

    def _dispatch(self, status: AuditStatus, key_slot: str | None) -> None:
        try:
            self.submitter.submit(status.id)
        except SubmitError as e:
            # Record the failure where every client looks, and free the key so a retry makes a new audit.
            self.audits.update(
                status.id,
                state=AuditState.FAILED,
                finished_at=now(),
                error=AuditError(stage=None, type="SubmitError", message=f"{e}; submit the audit again"),
            )
            if key_slot is not None:
                self.index.release(key_slot)
            raise

    def _register_fingerprint(self, record: AuditRecord) -> None:
        """Make a keyed audit findable by keyless POSTs of the same spec, unless another unfinished one is."""
        slot = self.index.spec_slot(record.spec_fingerprint)
        try:
            for _ in range(MAX_CHAIN):
                claim = self.index.claim(slot, record.spec_fingerprint, record.id)
                if claim.won or claim.audit_id == record.id:
                    return
                try:
                    if not self.audits.status(claim.audit_id).state.finished:
                        return
                except KeyError:
                    return  # that audit is being created right now and will be the one keyless POSTs find
                slot = self.index.spec_slot(record.spec_fingerprint, after=claim.audit_id)
        except StorageError as e:
            # Only an optimisation for later keyless POSTs; the audit itself exists and runs.
            log.warning("audit %s: not indexed by its spec (%s)", record.id, e)

    # -- reading --------------------------------------------------------------------------------------

    def status(self, audit_id: str) -> AuditStatus:
        """The audit's status, or a 404."""
        try:
            return self.audits.status(audit_id)
        except KeyError:
            raise ApiError(404, f"no audit {audit_id!r}", "list audits with GET /audits") from None

    def get(self, audit_id: str) -> AuditRecord:
        """The audit's status and spec."""
        return AuditRecord.of(self.status(audit_id), self.audits.spec(audit_id))

    def page(self, state: AuditState | None, limit: int, cursor: str | None) -> AuditPage:
        """Up to ``limit`` audits in ``state`` (any when None), newest first, after audit ``cursor``."""
        items: list[AuditStatus] = []
        for audit_id in self.audits.ids():
            if cursor is not None and audit_id >= cursor:
                continue
            try:
                status = self.audits.status(audit_id)
            except KeyError:
                continue  # deleted between listing and reading
            if state is not None and status.state is not state:
                continue
            if len(items) == limit:
                return AuditPage(items=items, next_cursor=items[-1].id)
            items.append(status)
        return AuditPage(items=items, next_cursor=None)

    # -- cancellation ---------------------------------------------------------------------------------

    def cancel(self, audit_id: str) -> Cancellation:
        """Record a cancellation request; an audit no worker has picked up yet is cancelled at once."""
        status = self.status(audit_id)
        if status.state is AuditState.CANCELLED:
            return Cancellation(AuditRecord.of(status, self.audits.spec(audit_id)), requested=False)
        if status.state.finished:
            raise ApiError(409, f"audit {audit_id} has already {status.state.value}; there is nothing to cancel")
        self.audits.request_cancel(audit_id)
        self._on_cancel_requested(status)
        try:
            self.submitter.stop(audit_id)
        except Exception as e:  # the request is recorded; the pipeline honours it even if Ray did not answer
            log.warning("audit %s: submitter could not stop it: %s", audit_id, e)
        status = self.audits.status(audit_id)
        if status.state is AuditState.QUEUED and status.attempts == 0:
            # No pipeline has started on it, so none will write its final state; a pipeline that starts
            # later sees cancel.json first and stops.
            status = self.audits.update(audit_id, state=AuditState.CANCELLED, finished_at=now())
        log.info("audit %s: cancellation requested (state %s)", audit_id, status.state.value)
        return Cancellation(AuditRecord.of(status, self.audits.spec(audit_id)), requested=True)
