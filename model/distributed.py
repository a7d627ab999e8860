"""The process environment DeepSpeed needs, shared by training (`deepspeed.initialize`) and hosting
(`deepspeed.init_inference`, model/engine.py).

Under the `deepspeed` launcher every rank gets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_SIZE; a plain `python` run gets single-process defaults. Call `prepare_distributed_env` before the
first `import deepspeed`: the accelerator choice (DS_ACCELERATOR) is read once, at import.
"""

import os
from pathlib import Path

import torch

from runtime.supervisor import free_port


def resolve_device(name: str | None = "auto") -> torch.device:
    """ "auto" or None -> this rank's GPU when there is one, else the CPU; anything else as given."""
    if name not in (None, "auto"):
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def prepare_distributed_env(cache_dir: Path | None = None, device: torch.device | None = None) -> None:
    """Single-process defaults for what DeepSpeed reads from the environment; values already set (by the
    launcher, or by the user) are kept.

    cache_dir: JIT-built DeepSpeed ops go to cache_dir/torch_extensions (the first CPU run with more than
    one rank compiles a shared-memory all-reduce op for about a minute). device: makes DeepSpeed use the
    accelerator of that device type (its own detection would take a GPU even when asked for the CPU).
    """
    single_process = "WORLD_SIZE" not in os.environ
    defaults = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port(os.environ["MASTER_ADDR"]))
    # DeepSpeed's CPU all-reduce reads LOCAL_SIZE (ranks on this machine) and crashes when it is unset;
    # torchrun names it LOCAL_WORLD_SIZE
    local_size = os.environ.get("LOCAL_WORLD_SIZE", "1" if single_process else None)
    if local_size is not None:
        os.environ.setdefault("LOCAL_SIZE", local_size)
    if cache_dir is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(cache_dir) / "torch_extensions"))
    if device is not None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else device.type)
