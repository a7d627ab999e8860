"""The one object that runs the model for the server: built from (checkpoint, device, dtype).

It hosts the MemoryLLM through DeepSpeed inference (model/engine.py) with its tokenizer, answers prompts
from the live memory pool, computes a new pool for a context off to the side (the model's functional
path, which leaves the live pool untouched), and publishes a finished pool. It holds no locks:
`serving.state.LiveState` decides who runs when.
"""

import hashlib
import logging
from pathlib import Path

import torch

from model import MemoryState
from model.engine import EngineConfig, load_engine
from model.memory_pool import replayed_pool
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
        self.base_state = self.model.memory_state()  # the checkpoint's own pool: a bank replays onto it
        self._digest: tuple[int, str] | None = None
        log.info("hosting %s on %s (%s) with DeepSpeed inference", checkpoint, self.device, self.dtype)

    @property
    def max_context_tokens(self) -> int:
        """Longest context one injection takes (the checkpoint's window minus the memory prefix)."""
        return self.model.config.max_context_tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (the model's bos embedding stands in for <bos>)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, stop: str = "\n",
                 retrieved: torch.Tensor | None = None) -> str:
        """Greedy continuation of `prompt` from the live memory, ending at `stop` or after max_new_tokens;
        `retrieved` memory tokens [L, r, d] from the bank go right after the pool."""
        ids = torch.tensor([self.encode(prompt)], device=self.device)
        extra = {} if retrieved is None else {"retrieved_memory": retrieved.to(self.device)}
        output = self.hosted.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=[stop],
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **extra,
        )
        return self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)

    @torch.no_grad()
    def next_pool(
        self, pool: torch.Tensor | None, context_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inject one context into `pool` (None: the live pool) off to the side; the live pool stays as is.

        Returns the new pool, the context's new tokens and the dropped indices (None when it fills an empty
        pool by tiling), which is what the memory bank records to replay the update exactly.
        """
        ids = torch.tensor([context_ids], device=self.device)
        tokens, dropped = self.model.memory_update(ids, memory=pool)
        base = pool if pool is not None else self.model.memory
        return replayed_pool(base, tokens, dropped), tokens, dropped

    @torch.no_grad()
    def lm_loss(self, text: str) -> float:
        """Mean next-token cross-entropy of `text` with the live pool in front (the degradation probe)."""
        ids = torch.tensor([self.encode(text)], device=self.device)
        logits = self.hosted.forward(ids).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))

    def decode(self, ids: list[int]) -> str:
        """The text of token ids."""
        return self.tokenizer.decode(ids)

    @property
    def memory_shape(self) -> tuple[int, int, int, str, bool]:
        """(layers, tokens per injection K, hidden size, pool dtype, per-layer drops) of the hosted model."""
        config = self.model.config
        dtype = str(self.model.memory.dtype).removeprefix("torch.")
        return (config.num_hidden_layers, config.num_tokens, config.hidden_size, dtype,
                config.drop_memory_per_layer)

    def memory_info(self) -> dict[str, int | str]:
        """Layers, pool tokens N, tokens per injection K and dtype of the memory (for /v1/health)."""
        layers, tokens, _, dtype, _ = self.memory_shape
        return {"layers": layers, "pool_tokens": self.model.config.num_memory_tokens,
                "tokens_per_injection": tokens, "dtype": dtype}

    def live_pool(self) -> tuple[torch.Tensor, bool]:
        """The live pool (not a copy) and whether it is initialised."""
        return self.model.memory.detach(), bool(self.model.initialized)

    def pool_sha256(self) -> str:
        """SHA-256 of the live pool's bytes (computed once per pool generation)."""
        version = self.model.pool_generation
        if self._digest is None or self._digest[0] != version:
            pool = self.model.memory.detach().contiguous().cpu()
            digest = hashlib.sha256(pool.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            self._digest = (version, digest)
        return self._digest[1]

    def publish(self, pool: torch.Tensor, num_injections: int) -> None:
        """Make `pool` the live memory (after `num_injections` injections in all)."""
        state = MemoryState(pool, self.model.pool_generation, num_injections, initialized=True)
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
