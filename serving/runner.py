"""The one object that runs the model for the server: built from (checkpoint, device, dtype).

It hosts the MemoryLLM through DeepSpeed inference (model/engine.py) with its tokenizer, answers prompts
from the live memory pool, computes a new pool for a context off to the side (the model's functional
path, which leaves the live pool untouched), and publishes a finished pool. It holds no locks:
`serving.state.LiveState` decides who runs when.
"""

import logging
from pathlib import Path

import torch

from model import MemoryState
from model.engine import EngineConfig, load_engine
from model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class ModelRunner:
    """A hosted checkpoint: tokenizer, engine, and the operations the server needs.

    device None: this machine's GPU if it has one, else the CPU; dtype "auto": the checkpoint's own.
    cache_dir: where DeepSpeed keeps the ops it builds (cache_dir/torch_extensions).
    """

    def __init__(self, checkpoint: Path, device: str | None = None, dtype: str = "auto",
                 cache_dir: Path | None = None):
        self.tokenizer = load_tokenizer(checkpoint)
        self.hosted = load_engine(checkpoint, EngineConfig(dtype=dtype, device=device, cache_dir=cache_dir))
        self.model = self.hosted.model  # the MemoryLLM under the engine: memory state and injections
        self.device = str(self.hosted.device)
        self.dtype = str(self.hosted.dtype).removeprefix("torch.")
        log.info("hosting %s on %s (%s) with DeepSpeed inference", checkpoint, self.device, self.dtype)

    @property
    def max_context_tokens(self) -> int:
        """Longest context one injection takes (the checkpoint's window minus the memory prefix)."""
        return self.model.config.max_context_tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (the model's bos embedding stands in for <bos>)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, stop: str = "\n") -> str:
        """Greedy continuation of `prompt` from the live memory, ending at `stop` or after max_new_tokens."""
        ids = torch.tensor([self.encode(prompt)], device=self.device)
        output = self.hosted.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=[stop],
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)

    @torch.no_grad()
    def next_pool(self, pool: torch.Tensor | None, context_ids: list[int]) -> torch.Tensor:
        """The pool after injecting one context into `pool` (None: the live pool); the live pool stays as is.

        Starting from the live pool lets the model fill an uninitialised pool by tiling.
        """
        ids = torch.tensor([context_ids], device=self.device)
        return self.model.updated_memory(ids, memory=pool)

    def publish(self, pool: torch.Tensor, num_injections: int) -> None:
        """Make `pool` the live memory (after `num_injections` injections in all)."""
        state = MemoryState(pool, self.model.memory_version, num_injections, initialized=True)
        self.model.set_memory_state(state)

    @property
    def num_injections(self) -> int:
        """Contexts injected into the live pool since it was empty."""
        return self.model.num_injections

    def save_memory(self, path: Path) -> None:
        """Write the live memory state to `path` (safetensors with the model's own checksum)."""
        self.model.save_memory_state(path)

    def load_memory(self, path: Path) -> MemoryState:
        """Make the memory state in `path` live; raises model.MemoryStateError if it does not verify."""
        return self.model.load_memory_state(path)
