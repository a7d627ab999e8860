"""Run `ckl serve` as a child process: start it and wait until it answers, SIGKILL it, stop it, restart it.

Used by the main job (a detached server that outlives it) and by tests (a server per test, killed at will).
The child runs with CKL_HOME=<state>, so it announces itself in `<state>/server.json` and logs to
`<state>/logs/serve.log`. A restart comes back on the same port, so clients keep their URL.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from serving.client import SERVER_FILE
from serving.settings import DEFAULT_CHECKPOINT, READ_TOKEN_ENV, WRITE_TOKEN_ENV

__all__ = ["DEFAULT_CHECKPOINT", "ServerProcess", "ServerStartError", "stop_running_server"]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def ckl_command() -> str:
    """The `ckl` entry point of this Python environment."""
    return str(Path(sys.executable).with_name("ckl"))


class ServerStartError(RuntimeError):
    """The server process exited or did not answer; the message carries the end of its log."""


class ServerProcess:
    """One `ckl serve` child process; `url` and `process` are set once it answers."""

    def __init__(
        self,
        checkpoint: Path,
        state: Path,
        write_token: str | None = None,
        read_token: str | None = None,
        port: int = 0,
        extra_args: Sequence[str] = (),
        detach: bool = False,
        env: Mapping[str, str] | None = None,
    ):
        self.checkpoint = Path(checkpoint)
        self.state = Path(state)
        self.tokens = {WRITE_TOKEN_ENV: write_token, READ_TOKEN_ENV: read_token}
        self.port = port
        self.extra_args = list(extra_args)
        self.detach = detach  # own session: survives the parent and its Ctrl-C
        self.env = dict(env or {})  # extra environment variables of the child (e.g. CKL_CRASH_AT)
        self.log_path = self.state / "logs" / "serve.log"
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self._log_offset = 0

    @property
    def snapshots(self) -> Path:
        return self.state / "snapshots"

    def start(self, timeout: float = READY_TIMEOUT_S) -> "ServerProcess":
        """Launch the server and wait until /v1/health answers ; ServerStartError if it exits or hangs."""
        env = {name: value for name, value in os.environ.items() if name not in self.tokens}
        env.update({name: token for name, token in self.tokens.items() if token}, CKL_HOME=str(self.state))
        env.update(self.env)
        command = [ckl_command(), "serve", "--model", str(self.checkpoint), "--port", str(self.port),
                   "--snapshots", str(self.snapshots), *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.detach,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise ServerStartError(f"ckl serve exited with {code}; its log:\n{self.log()}")
            self.url = self._announced_url()
            if self.url and self._answers():
                self.port = int(self.url.rsplit(":", 1)[1])  # a restart comes back on the same port
                return self
            time.sleep(0.2)
        self.kill()
        raise ServerStartError(f"ckl serve did not answer within {timeout:.0f} s; its log:\n{self.log()}")

    def _announced_url(self) -> str | None:
        try:
            info = json.loads((self.state / SERVER_FILE).read_text())
        except (OSError, ValueError):
            return None
        return info.get("url") if info.get("pid") == self.process.pid else None

    def _answers(self) -> bool:
        try:  # 401: up, with reads guarded by a read token
            return httpx.get(f"{self.url}/v1/health", timeout=5).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        """What the server logged since its last start."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a lost node would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (uvicorn finishes the requests in flight), SIGKILL after `timeout`."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    @staticmethod
    def run_ckl(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run another `ckl` command to completion; CalledProcessError (with its output) if it fails."""
        return subprocess.run([ckl_command(), *args], env=env, capture_output=True, text=True, check=True)


def stop_running_server(state: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server that `<state>/server.json` names, if it still runs; True if one was stopped."""
    path = Path(state) / SERVER_FILE
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not _is_server(pid):
        path.unlink(missing_ok=True)  # left by a server that was killed
        return False
    os.kill(pid, signal.SIGTERM)  # a graceful shutdown removes server.json itself
    deadline = time.monotonic() + timeout
    while _is_server(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _is_server(pid):
        os.kill(pid, signal.SIGKILL)
        path.unlink(missing_ok=True)
    return True


def _is_server(pid: int) -> bool:
    """Whether `pid` is a live `ckl serve` process (not a zombie, not a reused pid)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return status not in ("Z", "X") and b"serve" in arguments
