"""MemoryLLM: a Llama decoder with a self-updating latent memory pool (see model/memoryllm.py).

`from model import MemoryLLM, MemoryLLMConfig` loads torch and transformers on first use only, so light
modules of this package (e.g. model.tokenizer) stay cheap to import.
"""

import importlib
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default"  # the committed default model

_EXPORTS = {
    "MemoryLLM": "model.memoryllm",
    "MemoryLLMConfig": "model.memoryllm",
    "MemoryState": "model.memory_pool",
    "MemoryStateError": "model.memory_state",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
