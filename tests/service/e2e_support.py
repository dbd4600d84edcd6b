"""Helpers of the end-to-end API test: the real app served by ``dfc-audit serve`` in a child process.

The child gets its settings only from DFC_* variables (as in production), listens on a free loopback port,
and starts its own local Ray on the first submission. It runs in its own process group, so stopping it
(gracefully or by SIGKILL, to simulate a crash) also ends the Ray processes it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int | str) -> tuple[int, int] | None:
    """(parent id, start time in clock ticks) of a live process, from /proc; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(id, start time) of every live descendant of ``pid``; the start time guards against a reused id."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(entry.name)) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


class ServedApi:
    """One ``dfc-audit serve`` child process; ``start`` again after ``kill`` for a fresh process on the same store."""

    def __init__(self, env: dict[str, str], log_dir: Path, api_key: str) -> None:
        self.env, self.log_dir, self.api_key = env, log_dir, api_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.log_path = log_dir / "serve-0.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30.0)

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.port = free_port()
        self.starts += 1
        self.log_path = self.log_dir / f"serve-{self.starts}.log"
        dfc_audit = Path(sys.executable).with_name("dfc-audit")
        command = [str(dfc_audit), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dfc-audit serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not come up within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child's whole process group (the server and the Ray it started) and wait for the server."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        pgid = proc.pid  # start_new_session: the group id is the child's pid
        # Ray's worker processes start sessions of their own, so the group does not reach them: note the
        # server's descendants now, while their parents still link them to it.
        descendants = _descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Ray processes left in the group (a SIGTERM'd server may have left some): end them too.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        for pid, started in descendants:
            stat = _proc_stat(pid)
            if stat is not None and stat[1] == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def wait_for_audit(
    client: httpx.Client, audit_id: str, done: Callable[[dict[str, Any]], bool], timeout: float, served: ServedApi
) -> dict[str, Any]:
    """Poll GET /audits/{id} until ``done(record)``; on a timeout fail with the last record and the server log."""
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/audits/{audit_id}")
        assert response.status_code == 200, response.text
        record = response.json()
        if done(record):
            return record
        time.sleep(0.5)
    raise AssertionError(
        f"audit {audit_id} still {record.get('state')} after {timeout} s (error: {record.get('error')})\n"
        f"--- server log ---\n{served.log_tail()}"
    )


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in a Prometheus text exposition (``labels`` as written, e.g. 'state="x"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return None
