"""Where ckl keeps its local state (services, logs, snapshots): `.ckl/` under the working directory.

Override with the environment variable CKL_HOME.
"""

import os
from pathlib import Path


def state_dir() -> Path:
    """The project-local state directory (created on demand)."""
    path = Path(os.environ.get("CKL_HOME", Path.cwd() / ".ckl")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def logs_dir() -> Path:
    """Directory for service and job logs."""
    path = state_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Project-local cache for unpacked tools and build artefacts: `.cache/` under the working directory.

    Override with the environment variable CKL_CACHE.
    """
    path = Path(os.environ.get("CKL_CACHE", Path.cwd() / ".cache")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
