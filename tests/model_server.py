"""Test helpers for the model server: a tiny random checkpoint and a real `ckl serve` subprocess.

Shared by test modules that need a running server (`from model_server import ServerProcess, ...`).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

WRITE_TOKEN = "test-write-token"
TOKENIZER_TEXTS = [
    "Ada Lovelace was born in London in 1815 and wrote the first published algorithm.",
    "Q: Where was Ada Lovelace born?\nA: London\n",
    "The river flows north through the valley; the town on its bank is called Millbrook.",
    "Kafka topics hold documents; the model server injects them into memory in order.",
]


def make_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random MemoryLLM (2 layers, d=32, K=8, N=32, window 128) with a byte-level tokenizer, saved."""
    import torch

    from model import MemoryLLM, MemoryLLMConfig
    from model.tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320)
    config = MemoryLLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_tokens=8,
        num_blocks=4,
        num_memory_tokens=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,  # large enough that the memory visibly changes answers
    )
    torch.manual_seed(seed)
    MemoryLLM(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


class ServerProcess:
    """`ckl serve` on a free port in its own state dir; started, SIGKILLed or stopped by the test."""

    def __init__(
        self,
        checkpoint: Path,
        state: Path,
        write_token: str | None = WRITE_TOKEN,
        read_token: str | None = None,
        extra_args: Sequence[str] = (),
    ):
        self.checkpoint = checkpoint
        self.state = state
        self.tokens = {"CKL_WRITE_TOKEN": write_token, "CKL_READ_TOKEN": read_token}
        self.extra_args = list(extra_args)
        self.log_path = state / "serve.log"
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    @property
    def snapshots(self) -> Path:
        return self.state / "snapshots"

    def start(self, timeout: float = 60) -> "ServerProcess":
        env = {k: v for k, v in os.environ.items() if k not in self.tokens}
        env.update({name: token for name, token in self.tokens.items() if token}, CKL_HOME=str(self.state))
        ckl = Path(sys.executable).with_name("ckl")
        command = [str(ckl), "serve", "--model", str(self.checkpoint), "--port", "0",
                   "--snapshots", str(self.snapshots), *self.extra_args]
        self.state.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ckl serve exited with {self.process.returncode}:\n{self.log()}")
            self.url = self._announced_url()
            if self.url and self._healthy():
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"ckl serve did not answer within {timeout} s:\n{self.log()}")

    def _announced_url(self) -> str | None:
        try:
            info = json.loads((self.state / "server.json").read_text())
        except (OSError, ValueError):
            return None
        return info["url"] if info.get("pid") == self.process.pid else None

    def _healthy(self) -> bool:
        try:
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
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
