"""Memory-state files for snapshots: the pool as safetensors, its bookkeeping and a SHA-256 in the header.

The digest covers the pool's raw bytes, dtype, shape and the bookkeeping fields, so a flipped bit in the
tensor or an edited counter is refused on load. Files are written to a temporary name and renamed, so a
crash never leaves a half-written snapshot under the final name.
"""

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.memory_pool import MemoryState

FORMAT = "ckl-memory-state/1"


class MemoryStateError(ValueError):
    """A memory-state file that cannot be trusted: unreadable, wrong format, or a checksum mismatch."""


def state_digest(state: MemoryState) -> str:
    """SHA-256 over the pool's bytes, dtype, shape and bookkeeping."""
    pool = state.pool.detach().contiguous().cpu()
    digest = hashlib.sha256()
    digest.update(
        f"{FORMAT}|{pool.dtype}|{tuple(pool.shape)}|{state.generation}|{state.num_injections}|"
        f"{int(state.initialized)}|".encode()
    )
    digest.update(pool.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(state: MemoryState, path: str | os.PathLike) -> str:
    """Write `state` to `path` atomically; returns the SHA-256 recorded in the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sha256 = state_digest(state)
    metadata = {
        "format": FORMAT,
        "version": str(state.generation),  # the file key predates the rename
        "num_injections": str(state.num_injections),
        "initialized": str(int(state.initialized)),
        "sha256": sha256,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"memory": state.pool.detach().contiguous().cpu()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return sha256


def load_state(path: str | os.PathLike) -> MemoryState:
    """Read a memory-state file (pool on the CPU) and verify its checksum; MemoryStateError if it fails."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            pool = f.get_tensor("memory") if "memory" in f.keys() else None
    except (SafetensorError, OSError) as error:
        raise MemoryStateError(f"cannot read memory-state file {path}: {error}") from error
    if metadata.get("format") != FORMAT or pool is None:
        raise MemoryStateError(f"{path} is not a ckl memory-state file (format {metadata.get('format')!r})")
    try:
        state = MemoryState(
            pool=pool,
            generation=int(metadata["version"]),
            num_injections=int(metadata["num_injections"]),
            initialized=bool(int(metadata["initialized"])),
        )
    except (KeyError, ValueError) as error:
        raise MemoryStateError(f"malformed metadata in memory-state file {path}: {error!r}") from error
    actual = state_digest(state)
    if actual != metadata.get("sha256"):
        raise MemoryStateError(
            f"checksum mismatch in {path}: recorded {metadata.get('sha256')}, computed {actual}; "
            "refusing to load"
        )
    return state
