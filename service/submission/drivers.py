"""Who drives each audit: a small record per (re)submission, so a restarted API can tell an orphan from a live audit.

``audits/{id}/driver/{generation:06d}.json`` is written by the API that hands the audit to Ray: generation 1 when
it is submitted, generation n+1 when an API takes over an audit whose driver of generation n is gone. Every
generation is created with the store's conditional put, so of several API instances that see the same orphan
exactly one resumes it. The newest generation is the one that counts.

A local-Ray driver is the API process that holds the audit's Ray task (the task dies with that process's Ray).
It is alive while that process is: on the same machine a restarted API checks the recorded process id (and
its start time, so a reused id does not count); from another machine it can only trust the record's
``renewed_at``, which the owner renews every third of ``DFC_DRIVER_LEASE_S`` while the task runs. A Ray Jobs
record only says where the job was submitted; the cluster knows whether it runs.

The records live next to status.json rather than in it: the pipeline stays the only writer of status.json, and
the status schema (which refuses unknown fields) is unchanged for workers on an older image.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.pipeline.status import AuditStore, now
from workers.storage import ObjectNotFound, StorageError

DriverKind = Literal["local-ray", "ray-job"]


@cache
def boot_id() -> str:
    """This machine's boot id (Linux); a process id is only meaningful within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """Start time (clock ticks after boot) of a live process, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # Field 22 of stat (starttime); fields[0] here is field 3 (state). A zombie has exited already.
    return None if fields[0] == "Z" else int(fields[19])


class Owner(BaseModel):
    """A process on a machine: the API process that holds an audit's Ray task."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    host: str
    boot_id: str = ""
    pid: int
    pid_start: int | None = None

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(host=socket.gethostname(), boot_id=boot_id(), pid=pid, pid_start=process_start(pid))

    def alive_here(self) -> bool | None:
        """Whether the process still runs, when this machine can tell (same host); None when it cannot."""
        if self.host != socket.gethostname():
            return None
        if self.boot_id and boot_id() and self.boot_id != boot_id():
            return False  # the machine rebooted since: every process of that boot is gone
        started = process_start(self.pid)
        return started is not None and (self.pid_start is None or started == self.pid_start)


class DriverRecord(BaseModel):
    """One generation of an audit's driver record."""

    model_config = ConfigDict(extra="ignore")
    audit_id: str
    generation: int = Field(ge=1)
    kind: DriverKind
    address: str = Field(description='The Ray address the audit went to ("local" for an embedded Ray).')
    session: str = Field(description="The submitting submitter's random id (one per API process and Ray).")
    owner: Owner
    reason: str = "submitted"
    submitted_at: dt.datetime = Field(default_factory=now)
    renewed_at: dt.datetime = Field(default_factory=now)
    released: bool = Field(False, description="Set when the owner shut its Ray down cleanly.")

    def driver_gone(self, lease_s: float, at: dt.datetime | None = None) -> bool:
        """Whether the local-Ray driver of this record can no longer be running the audit."""
        if self.released:
            return True
        alive = self.owner.alive_here()
        if alive is not None:
            return not alive
        return ((at or now()) - self.renewed_at).total_seconds() > lease_s


class DriverRecords:
    """Reads and writes the driver records of the audits in one store."""

    def __init__(self, audits: AuditStore) -> None:
        self.audits = audits

    def key(self, audit_id: str, generation: int) -> str:
        return self.audits.key(audit_id, f"driver/{generation:06d}.json")

    def latest(self, audit_id: str) -> DriverRecord | None:
        """The newest generation, or None when no API recorded a driver (audits run by the CLI, older ones)."""
        keys = list(self.audits.store.list(self.audits.key(audit_id, "driver/")))
        for key in reversed(keys):  # zero-padded generations: lexicographic order is numeric order
            try:
                return DriverRecord.model_validate(self.audits.store.get_json(key))
            except (ObjectNotFound, ValidationError, StorageError):
                continue  # unreadable: an older generation still says who drove it
        return None

    def claim(
        self, audit_id: str, *, kind: DriverKind, address: str, session: str, reason: str, after: int = 0
    ) -> DriverRecord | None:
        """Create generation ``after + 1``; None when another API created it first (it drives the audit)."""
        record = DriverRecord(
            audit_id=audit_id,
            generation=after + 1,
            kind=kind,
            address=address,
            session=session,
            owner=Owner.current(),
            reason=reason,
        )
        key, data = self.key(audit_id, record.generation), record.model_dump(mode="json")
        return record if self.audits.store.put_json(key, data, if_absent=True) else None

    def renew(self, record: DriverRecord, *, released: bool = False) -> DriverRecord:
        """Rewrite ``record`` with a fresh ``renewed_at`` (and ``released`` when the owner lets go)."""
        record = record.model_copy(update={"renewed_at": now(), "released": released})
        self.audits.store.put_json(self.key(record.audit_id, record.generation), record.model_dump(mode="json"))
        return record
