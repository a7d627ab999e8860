"""One process supervisor for every background service ckl runs: the local Kafka, ZooKeeper and MLflow
(localservices/) and the model server (serving/process.py).

A supervised process runs in its own process group on a port of 127.0.0.1; `<state>/run/<name>.json`
records its pid, start time and port, `<state>/logs/<name>.log` its output. A restart comes back on the
same port when it is still free, so clients keep their address. Linux only: liveness and process groups
are read from /proc.
"""

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """A local service failed to start, answer or stop; the message points to its log."""


@dataclass
class ServiceStatus:
    """What runs where: one row of `ckl services status`."""

    name: str
    state: str  # "up" (answers), "not answering" (process alive), "down"
    pid: int | None
    address: str | None
    rss_mb: float | None
    log: str


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks since boot; tells a pid from its reuse."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _group_members(pgid: int, started_since: int) -> list[int]:
    """Live processes of process group `pgid` started no earlier than its leader was."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if int(fields[2]) == pgid and int(fields[19]) >= started_since:
            members.append(int(entry.name))
    return members


def _rss_mb(pids: list[int]) -> float:
    """Resident memory of the given processes together, in MiB."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, since: int = 0, max_lines: int | None = 25) -> str:
    """The last `max_lines` lines a log got after byte offset `since` (None: all of it, as written); ""
    when the log cannot be read."""
    try:
        with path.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text if max_lines is None else "\n".join(text.splitlines()[-max_lines:])


class ManagedProcess:
    """One service process: launched in its own process group, tracked by `run/<name>.json`.

    The record keeps the port when the process stops, so a restart (after `kill()` too) comes back on the
    same address if that port is still free. Subclasses say how to launch and how to tell it is ready.
    """

    name = "process"
    preferred_port: int | None = None  # the first launch's port when set (else a free one)

    def __init__(self, state: Path) -> None:
        self.state = Path(state).resolve()
        self.record_path = state / "run" / f"{self.name}.json"
        self.log_path = state / "logs" / f"{self.name}.log"
        self._popen: subprocess.Popen | None = None
        self._log_offset = 0

    # -- what subclasses provide
    def command(self, port: int) -> list[str]:
        """The command line that runs the service on `port` (configs written here too)."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Environment of the service process."""
        return dict(os.environ)

    def answers(self) -> bool:
        """Whether the running service does its job (a real request, not a port probe)."""
        raise NotImplementedError

    def should_relaunch(self, startup_log: str) -> bool:
        """Whether an exit during startup is transient, so launching again may succeed."""
        return False

    # -- record
    def _read_record(self) -> dict:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_record(self, **fields) -> None:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self._read_record(), **fields}))
        tmp.replace(self.record_path)

    @property
    def port(self) -> int | None:
        """The port the service runs on (or ran on last)."""
        return self._read_record().get("port")

    @property
    def pid(self) -> int | None:
        """Pid of the running service, None when it is down (a stale record counts as down)."""
        record = self._read_record()
        pid = record.get("pid")
        if pid is None:
            return None
        if self._popen is not None and self._popen.pid == pid and self._popen.poll() is not None:
            return None
        if start_ticks(pid) != record.get("start_ticks"):
            return None
        return pid

    def _members(self) -> list[int]:
        record = self._read_record()
        if record.get("pid") is None:
            return []
        if self._popen is not None:
            self._popen.poll()  # reap our own child so it does not linger as a zombie
        leader_ticks = start_ticks(record["pid"])
        if leader_ticks is not None and leader_ticks != record["start_ticks"]:
            return []  # the pid (hence the group id) now belongs to another process
        return _group_members(record["pid"], record["start_ticks"])

    # -- lifecycle
    def launch(self) -> None:
        """Start the process unless it runs already; returns without waiting for readiness."""
        if self.pid is not None:
            return
        self._terminate_group()  # leftovers of a crashed run (e.g. children of a killed leader)
        if self._popen is not None:  # our previous child: reaped once all its threads (and sockets) are gone
            self._popen.wait(STOP_TIMEOUT_S)
        port = self.port if self.port is not None and port_is_free(self.port) else None
        port = port or self.preferred_port or free_port()
        command = self.command(port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
            self._log_offset = log.tell()
            self._popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), cwd=self.state, start_new_session=True,
            )
        self._write_record(pid=self._popen.pid, start_ticks=start_ticks(self._popen.pid), port=port)

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until the service answers; relaunch after transient startup exits; raise with the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid is None:
                startup_log = log_tail(self.log_path, self._log_offset, max_lines=400)
                if self.should_relaunch(startup_log):
                    time.sleep(1.0)
                    self.launch()
                    continue
                raise ServiceError(
                    f"{self.name} exited during startup; see {self.log_path}:\n"
                    f"{log_tail(self.log_path, self._log_offset)}"
                )
            if self.answers():
                return
            time.sleep(0.25)
        raise ServiceError(
            f"{self.name} did not answer within {timeout:.0f} s; see {self.log_path}:\n"
            f"{log_tail(self.log_path, self._log_offset)}"
        )

    def log(self) -> str:
        """What the process logged since its last launch."""
        return log_tail(self.log_path, self._log_offset, max_lines=None)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the process this object launched to exit; its exit code (negative: the signal that
        ended it), or None if it still runs after `timeout` or was not launched here."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Launch (if needed) and wait until the service answers."""
        self.launch()
        self.wait_ready(timeout)

    def send_stop(self) -> None:
        """Ask the process group to shut down (SIGTERM) without waiting."""
        self._signal_group(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop: SIGTERM, wait, then SIGKILL of the whole process group; nothing is left behind."""
        self._terminate_group(timeout)
        self._write_record(pid=None)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (simulates a crash; data stays as the crash left it)."""
        self._signal_group(signal.SIGKILL)
        self.wait_gone(10.0)
        self._write_record(pid=None)

    def restart(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Stop gracefully, then start again on the same port when possible."""
        self.stop()
        self.start(timeout)

    def status(self) -> ServiceStatus:
        """Pid, address, memory and whether the service answers."""
        pid = self.pid
        members = self._members() if pid is not None else []
        if pid is None:
            state = "down"
        else:
            state = "up" if self.answers() else "not answering"
        return ServiceStatus(
            name=self.name, state=state, pid=pid, address=self.endpoint if pid is not None else None,
            rss_mb=round(_rss_mb(members), 1) if members else None, log=str(self.log_path),
        )

    @property
    def address(self) -> str:
        """`host:port` of the service."""
        return f"{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        """What a client is given to connect (an address, or a URL for HTTP services)."""
        return self.address

    def _signal_group(self, signum: int) -> None:
        record = self._read_record()
        if self._members():
            try:
                os.killpg(record["pid"], signum)
            except ProcessLookupError:
                pass

    def wait_gone(self, timeout: float) -> bool:
        """Wait until no process of the group is left; False if some still run after `timeout`."""
        deadline = time.monotonic() + timeout
        while self._members():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _terminate_group(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if not self._members():
            return
        self._signal_group(signal.SIGTERM)
        if self.wait_gone(timeout):
            return
        self._signal_group(signal.SIGKILL)
        if not self.wait_gone(10.0):
            raise ServiceError(f"{self.name}: processes {self._members()} survived SIGKILL")
