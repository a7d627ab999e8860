"""Run `ckl serve` as a supervised child process (runtime/supervisor.py): start it and wait until it
answers, SIGKILL it, stop it, restart it on the same port.

Used by the main job (a server that outlives it) and by tests (a server per test, killed at will). The
child runs with CKL_HOME=<state>, so it announces itself in `<state>/server.json`; the supervisor keeps
`<state>/run/serve.json` and logs to `<state>/logs/serve.log`.
"""

import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import httpx

from model import DEFAULT_CHECKPOINT
from runtime.paths import cache_dir
from runtime.supervisor import DEFAULT_READY_TIMEOUT_S, HOST, STOP_TIMEOUT_S, ManagedProcess, start_ticks
from serving.client import SERVER_FILE
from serving.settings import READ_TOKEN_ENV, WRITE_TOKEN_ENV

__all__ = ["DEFAULT_CHECKPOINT", "ServerProcess", "ckl_command", "stop_running_server"]


def ckl_command() -> str:
    """The `ckl` entry point of this Python environment."""
    return str(Path(sys.executable).with_name("ckl"))


class ServerProcess(ManagedProcess):
    """One `ckl serve` child process, supervised like the local services."""

    name = "serve"

    def __init__(
        self,
        checkpoint: Path,
        state: Path,
        write_token: str | None = None,
        read_token: str | None = None,
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ):
        super().__init__(state)
        self.checkpoint = Path(checkpoint).resolve()
        self.tokens = {WRITE_TOKEN_ENV: write_token, READ_TOKEN_ENV: read_token}
        self.preferred_port = port or None
        self.extra_args = list(extra_args)
        self.env = dict(env or {})  # extra environment variables of the child (e.g. CKL_CRASH_AT)

    @property
    def snapshots(self) -> Path:
        return self.state / "snapshots"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        return self.url

    def command(self, port: int) -> list[str]:
        return [ckl_command(), "serve", "--model", str(self.checkpoint), "--port", str(port),
                "--snapshots", str(self.snapshots), *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if name not in self.tokens}
        env.update({name: token for name, token in self.tokens.items() if token})
        env.update(CKL_HOME=str(self.state), CKL_CACHE=str(cache_dir()))  # the child runs in the state dir
        return env | self.env

    def answers(self) -> bool:
        """/v1/health answers (401: up, with reads guarded by a read token)."""
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=5).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> Self:
        """Launch the server and wait until it answers; ServiceError (with its log) if it exits or hangs."""
        super().start(timeout)
        return self


def stop_running_server(state: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server that `<state>/server.json` names (however it was started), if it still runs; True if
    one was stopped."""
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
    if start_ticks(pid) is None:
        return False
    try:
        return b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
