"""The one object that runs the model for the server: built from (checkpoint, device, dtype).

It loads the MemoryLLM and its tokenizer, answers prompts from the live memory pool, computes a new pool
for a context off to the side (the model's functional path, which leaves the live pool untouched), and
publishes a finished pool. It holds no locks: `serving.state.LiveState` decides who runs when.
"""

import logging
from pathlib import Path

import torch

from model import MemoryLLM, MemoryState
from model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def default_device() -> str:
    """The best device here: the first GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(checkpoint: Path, device: str, dtype: str) -> MemoryLLM:
    """A checkpoint's MemoryLLM in eval mode on `device`; dtype "auto" keeps the checkpoint's dtype."""
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    return MemoryLLM.from_pretrained(checkpoint, dtype=torch_dtype).to(device).eval()


class ModelRunner:
    """A loaded checkpoint: tokenizer, model, and the operations the server needs."""

    def __init__(self, checkpoint: Path, device: str | None = None, dtype: str = "auto"):
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"no model checkpoint at {checkpoint} (config.json missing)")
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(checkpoint)
        self.model = load_model(checkpoint, self.device, dtype)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        log.info("loaded %s on %s (%s)", checkpoint, self.device, self.dtype)

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
        output = self.model.generate(
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
