"""Helpers of the end-to-end API test: the real app served by ``dfc-audit serve`` in a child process.

The child gets its settings only from DFC_* variables (as in production), listens on a free loopback port,
and starts its own local Ray on the first submission. It runs in its own process group, so stopping it
(gracefully or by SIGKILL, to simulate a crash) also ends the Ray processes it started; ``crash`` kills the
server process alone, as the OOM killer would, and reports which of its descendants outlived it.
Also here: a real Ray head with its Jobs API (``ray start --head --block``) for the Jobs submitter's tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
"""Ray's per-node agents: after their raylet is killed they exit by themselves, within about a minute."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int | str) -> tuple[int, int] | None:
    """(parent id, start time in clock ticks) of a live process, from /proc; None when it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (what a process started with start_new_session, and all it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split() if entry.name.isdigit() else []
        except OSError:
            continue
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


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
        for pid in session_members(pgid):  # whatever is left of the session (orphans the server's death reparented)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def crash(self, settle_s: float = 45.0) -> list[str]:
        """SIGKILL the server process alone; return the command lines of the processes it started that outlive it.

        Waits up to ``settle_s`` for them to go (a training actor busy in a long operation notices last that its
        raylet is gone, and a seed ensemble trains two at once on two cores), except Ray's per-node agents, which are
        known to linger for up to a minute (they notice on their own schedule that the raylet is gone); then ends them
        all.
        """
        assert self.proc is not None, "not running"
        session = self.proc.pid  # start_new_session: every process it starts stays in this session
        self.proc.kill()
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + settle_s
        while True:
            alive = [command_line(pid) for pid in session_members(session)]
            if all(c.startswith(RAY_AGENTS) for c in alive) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.kill()
        return alive

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


class RayHead:
    """A real one-node Ray cluster with its Jobs API, started with ``ray start --head --block`` in its own session.

    Its temporary folder is its own (short, for Ray's socket paths), so ``ray.init()`` elsewhere on the machine
    never finds it, and ``stop`` ends exactly the processes of its session (never ``ray stop``, which ends
    every Ray on the machine).
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
        self.address = ""

    def start(self, timeout: float = 90.0) -> str:
        """Start the head; return its Jobs API address. Raises RuntimeError when Ray cannot start here."""
        port = free_port()
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        command = [
            str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port=0",
            f"--dashboard-port={port}", "--dashboard-host=127.0.0.1", f"--temp-dir={self.temp_dir}",
            "--num-cpus=1", "--disable-usage-stats",
        ]  # fmt: skip
        with open(self.temp_dir / "head.log", "wb") as log:
            self.proc = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.address = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.address}/api/version", timeout=1).status_code == 200:
                    return self.address
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not answer within {timeout} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.temp_dir / "head.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            for _ in range(3):  # a second pass catches what was being started during the first
                for pid in session_members(self.proc.pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
            self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
