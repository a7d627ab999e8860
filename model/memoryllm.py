"""MemoryLLM (Wang et al. 2024, arXiv 2402.04624) on transformers 5: Llama decoder + latent memory pool.

Read top to bottom: config, LoRA adapters, attention, decoder layer, the model (memory prefix and its K/V
cache, query forward -- also what transformers' `generate` calls --, injection, memory state). The pool's
update rules live in `model/memory_pool.py`, memory-state files in `model/memory_state.py`.

Semantics, as the reference implementation (wangyu-ustc/MemoryLLM, `modeling_memoryllm.py`) computes them;
released checkpoints were trained with exactly these, so they are kept, quirks included:
- Memory is re-inserted at every layer l: the layer's rows are [bos_embedding[l], memory[l], text]. The
  input layer norm applies to the bos and memory rows too and their keys/values come from the normalised
  rows; queries, residual and MLP run on the text rows only. Every query sees the whole prefix and the
  text causally.
- RoPE positions in a query: bos 0, memory 1..N, text N+1..N+T (without bos: memory 0..N-1, text N..).
- Injection of a context of T tokens: the prefix is bos + the last K pool tokens (positions 0, 1..K, text
  K+1..K+T), `new_memory_positional_emb` is added to the last K rows of every layer's input (so on a
  context of T >= K it accumulates in the residual stream), and the query rows start at 1 + min(K, T):
  with T < K the last K - T old pool tokens are query rows too. Layer l's outputs at the last K rows
  (before the final norm) are the new memory tokens of layer l.
- An uninitialised pool takes part in nothing (no bos, no memory): text positions start at 0, and the
  first injection fills the pool by tiling. Its new tokens carry `new_memory_positional_emb` once more
  in every layer but the last (the reference adds it in place to a tensor its outputs alias).
- LoRA (config.lora_config): adapter "default" during injection; during queries "decoder_adapter" when
  config.add_decoder_lora, else "default".
Beyond the reference: a padding mask in queries is honoured (the reference ignores it when memory is
present), K is always exactly num_tokens when dropping (the reference computes int(N * (1 / num_blocks)),
one short for some block counts), and contexts longer than the window raise a ValueError.
"""

import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    LlamaConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)

from model import memory_pool
from model.memory_pool import MemoryState
from model.memory_state import load_state, save_state

INJECTION_ADAPTER = "default"
DECODER_ADAPTER = "decoder_adapter"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------- config


@strict
class MemoryLLMConfig(LlamaConfig):
    """Llama's fields plus the reference MemoryLLM's. Reads the released config.json layout (rope_theta and
    rope_scaling at the top level, `torch_dtype`) and writes it back next to transformers 5's fields."""

    model_type = "memoryllm"

    num_tokens: int = 256  # K: tokens one injection writes per layer
    num_memory_tokens: int = 12800  # kept for the released format; the pool size is num_blocks * num_tokens
    num_blocks: int = 50
    add_bos_embedding: bool = True
    drop_memory_per_layer: bool = False
    add_decoder_lora: bool = False
    lora_config: dict | None = None

    @property
    def pool_size(self) -> int:
        """N = num_blocks x num_tokens."""
        return self.num_blocks * self.num_tokens

    @property
    def max_context_tokens(self) -> int:
        """Longest context one injection takes: bos + K memory tokens + context fit the position window."""
        return self.max_position_embeddings - self.num_tokens - int(self.add_bos_embedding)

    def to_dict(self) -> dict:
        """transformers 5's dict plus the transformers 4 rope fields, so the reference code reads it too."""
        output = super().to_dict()
        rope = self.rope_parameters or {}
        output["rope_theta"] = rope.get("rope_theta")
        rope_type = rope.get("rope_type", "default")
        output["rope_scaling"] = (
            {"type": rope_type, "factor": rope["factor"]} if rope_type in ("linear", "dynamic") else None
        )
        return output


# ----------------------------------------------------------------------------------------------------- LoRA


class LoraDown(nn.Linear):
    """LoRA's A matrix (d_in -> r); peft initialises it kaiming-uniform."""


class LoraUp(nn.Linear):
    """LoRA's B matrix (r -> d_out); zero at initialisation, so a fresh adapter changes nothing."""


class LoraLinear(nn.Module):
    """A linear layer with LoRA adapters, laid out as peft lays them out so released checkpoints load:
    `base_layer.weight`, `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`. One adapter is active."""

    def __init__(
        self, base_layer: nn.Linear, adapters: Sequence[str], r: int, lora_alpha: float, dropout: float
    ):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict(
            {name: LoraDown(base_layer.in_features, r, bias=False) for name in adapters}
        )
        self.lora_B = nn.ModuleDict(
            {name: LoraUp(r, base_layer.out_features, bias=False) for name in adapters}
        )
        self.lora_dropout = nn.ModuleDict({name: nn.Dropout(dropout) for name in adapters})
        self.scaling = lora_alpha / r
        self.active_adapter = adapters[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        return (
            self.base_layer(x)
            + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling
        )


def add_lora_adapters(decoder: nn.Module, config: MemoryLLMConfig) -> None:
    """Replace the targeted linear layers of `decoder` by LoraLinear, as the reference's peft call does."""
    lora = config.lora_config
    targets = lora.get("target_modules")
    if not targets:
        raise ValueError("lora_config needs target_modules (the reference cannot infer them for 'memoryllm')")
    if isinstance(targets, str):

        def is_target(name: str) -> bool:
            return re.fullmatch(targets, name) is not None
    else:
        unknown = set(targets) - set(LINEAR_NAMES)
        if unknown:
            raise NotImplementedError(f"LoRA on {sorted(unknown)} is not supported; only {LINEAR_NAMES}")

        def is_target(name: str) -> bool:
            return name.rsplit(".", 1)[-1] in targets

    adapters = [INJECTION_ADAPTER] + ([DECODER_ADAPTER] if config.add_decoder_lora else [])
    for name, module in list(decoder.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and is_target(full_name):
                lora_linear = LoraLinear(
                    child, adapters, lora["r"], lora["lora_alpha"], lora.get("lora_dropout", 0.0)
                )
                setattr(module, child_name, lora_linear)


# ------------------------------------------------------------------------------------------------ attention


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on keys alone. x: (B, heads, S, head_dim); cos, sin: (B, S, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class MemoryAttention(nn.Module):
    """Llama attention with keys/values [memory prefix, cached text, new text]; queries are the new rows."""

    def __init__(self, config: MemoryLLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, heads * head_dim) -> (B, heads, S, head_dim)"""
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def prefix_kv(self, normed_rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys (rotated) and values of prefix rows that are attended to but never queried."""
        keys = rotate(self.split_heads(self.k_proj(normed_rows)), cos, sin)  # (B, kv_heads, P, head_dim)
        values = self.split_heads(self.v_proj(normed_rows))  # (B, kv_heads, P, head_dim)
        return keys, values

    def forward(
        self,
        normed_rows: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        batch, length, _ = normed_rows.shape
        cos, sin = position_embeddings
        queries = self.split_heads(self.q_proj(normed_rows))  # (B, heads, T, head_dim)
        keys = self.split_heads(self.k_proj(normed_rows))  # (B, kv_heads, T, head_dim)
        values = self.split_heads(self.v_proj(normed_rows))
        queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
        if past_key_values is not None:  # the cache holds text rows only; the prefix is added below
            keys, values = past_key_values.update(keys, values, self.layer_idx)
        if prefix_kv is not None:
            prefix_keys, prefix_values = prefix_kv  # (1 or B, kv_heads, P, head_dim)
            keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), keys], dim=2)
            values = torch.cat([prefix_values.expand(batch, -1, -1, -1), values], dim=2)
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def attention_mask_for(
    padding_mask: torch.Tensor | None, past_length: int, length: int, prefix_length: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (b, 1, T, P + past + T), True = attend: the whole prefix, the text causally, no padding.

    padding_mask: (B, past + T) with 0 at padding, or None without padding. A query always sees itself,
    so a padded row never has every key masked. None when nothing needs masking (one new token, no padding).
    """
    padded = padding_mask is not None
    if not padded and length == 1:
        return None
    query_index = torch.arange(past_length, past_length + length, device=device)[:, None]  # (T, 1)
    key_index = torch.arange(past_length + length, device=device)[None, :]  # (1, past + T)
    allowed = (key_index <= query_index)[None]  # (1, T, past + T)
    if padded:
        allowed = allowed & (
            padding_mask.bool()[:, None, :] | (key_index == query_index)[None]
        )  # (B, T, past+T)
    prefix = torch.ones(*allowed.shape[:2], prefix_length, dtype=torch.bool, device=device)
    return torch.cat([prefix, allowed], dim=-1)[:, None]


# -------------------------------------------------------------------------------------------- decoder layer


class MemoryDecoderLayer(nn.Module):
    """Llama's pre-norm block; the memory prefix rows only pass through the input norm and k/v projections."""

    def __init__(self, config: MemoryLLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MemoryAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def prefix_kv(self, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys/values of prefix rows (bos + memory): normalised by the input norm, projected, rotated."""
        return self.self_attn.prefix_kv(self.input_layernorm(rows), cos, sin)

    def forward(
        self,
        rows: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(
            self.input_layernorm(rows), position_embeddings, prefix_kv, attention_mask, past_key_values
        )
        rows = rows + attended
        return rows + self.mlp(self.post_attention_layernorm(rows))


class MemoryDecoder(nn.Module):
    """Embeddings, layers, final norm and rotary embedding, named as Llama's `model.*`."""

    def __init__(self, config: MemoryLLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MemoryDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)


# ---------------------------------------------------------------------------------------------------- model


class MemoryLLM(PreTrainedModel, GenerationMixin):
    """Llama decoder + memory pool `memory` [L, N, d], `bos_embedding` [L, 1, d],
    `new_memory_positional_emb` [1, 1, d] and the `initialized` flag (parameter names as released)."""

    config_class = MemoryLLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MemoryDecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True

    def __init__(self, config: MemoryLLMConfig):
        super().__init__(config)
        num_layers, d = config.num_hidden_layers, config.hidden_size
        self.model = MemoryDecoder(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.memory = nn.Parameter(torch.randn(num_layers, config.pool_size, d), requires_grad=False)
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))
        if config.add_bos_embedding:
            self.bos_embedding = nn.Parameter(torch.randn(num_layers, 1, d))
        if config.lora_config is not None:
            add_lora_adapters(self.model, config)
        self.pool_generation = 0  # +1 on every change of the pool in this process (update or load)
        self.num_injections = 0  # contexts injected since the pool was loaded or built
        self.use_memory_cache = True  # reuse the pool's keys/values across queries (see memory_kv)
        self._memory_kv: tuple[tuple, list] | None = None  # (fingerprint, per-layer keys/values)
        self._retrieved_kv: tuple | None = None  # the last query's retrieved tokens and prefix keys/values
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LoraDown):
            init.kaiming_uniform_(module.weight, a=5**0.5)
        elif isinstance(module, LoraUp):
            init.zeros_(module.weight)
        else:
            super()._init_weights(module)
        if module is self:  # the memory parameters, as the reference creates them
            init.normal_(self.memory)
            init.zeros_(self.new_memory_positional_emb)
            init.zeros_(self.initialized)
            if self.config.add_bos_embedding:
                init.normal_(self.bos_embedding)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader; the pool stays out of autograd by default, as in the reference."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        model.memory.requires_grad_(False)
        return loaded

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # ------------------------------------------------------------------------------------- memory prefix

    def _activate_adapter(self, injection: bool) -> None:
        """Select the LoRA adapter of the path about to run (no-op without LoRA)."""
        name = INJECTION_ADAPTER if injection or not self.config.add_decoder_lora else DECODER_ADAPTER
        for module in self.model.modules():
            if isinstance(module, LoraLinear):
                module.active_adapter = name

    def _prefix_rows(self, pool: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s prefix rows: (1, [bos] + n, d) for a pool [L, n, d], (B, [bos] + n, d) for a
        batch of pools [B, L, n, d]."""
        rows = pool[layer][None] if pool.dim() == 3 else pool[:, layer]
        if self.config.add_bos_embedding:
            bos = self.bos_embedding[layer][None].to(rows.dtype).expand(rows.shape[0], -1, -1)
            rows = torch.cat([bos, rows], dim=1)
        return rows

    def _position_embeddings(self, like: torch.Tensor, positions: torch.Tensor):
        """cos, sin: (b, S, head_dim) for position ids (b, S)."""
        return self.model.rotary_emb(like, positions)

    def _memory_kv_from(self, pool: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's prefix keys/values for a query: [bos, pool] at positions 0..P-1, (1, kv, P, hd)."""
        self._activate_adapter(injection=False)
        prefix_length = int(self.config.add_bos_embedding) + pool.shape[-2]
        positions = torch.arange(prefix_length, device=pool.device)[None]
        cos, sin = self._position_embeddings(pool, positions)
        return [
            layer.prefix_kv(self._prefix_rows(pool, i), cos, sin) for i, layer in enumerate(self.model.layers)
        ]

    def _memory_kv_fingerprint(self) -> tuple:
        """Changes whenever the cached keys/values would: pool generation, pool/weight storage, versions."""
        tensors = [self.memory] + ([self.bos_embedding] if self.config.add_bos_embedding else [])
        for layer in self.model.layers:
            tensors += [layer.input_layernorm.weight, *layer.self_attn.k_proj.parameters()]
            tensors += list(layer.self_attn.v_proj.parameters())
        return (self.pool_generation, *((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def memory_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pool's per-layer keys/values for queries, computed once per pool generation and reused.

        Recomputed automatically when the pool changes (inject, load) or the weights it depends on do
        (optimizer steps, `to()`). Holds 2 x L x (N + 1) x kv_dim values, like the pool itself.
        """
        fingerprint = self._memory_kv_fingerprint()
        if self._memory_kv is None or self._memory_kv[0] != fingerprint:
            self._memory_kv = None  # free the stale one before building the next
            with torch.no_grad():
                self._memory_kv = (fingerprint, self._memory_kv_from(self.memory))
        return self._memory_kv[1]

    def clear_memory_cache(self) -> None:
        """Drop the cached keys/values (they are rebuilt on the next query)."""
        self._memory_kv = None
        self._retrieved_kv = None

    def _query_memory_kv(self, memory: torch.Tensor | None, use_memory_cache: bool | None):
        """The prefix keys/values for a query, or None when no memory takes part (uninitialised pool)."""
        if memory is not None:
            return self._memory_kv_from(memory)
        if not self.initialized:
            return None
        use_cache = self.use_memory_cache if use_memory_cache is None else use_memory_cache
        if use_cache and not torch.is_grad_enabled():
            return self.memory_kv()
        return self._memory_kv_from(self.memory)

    def _with_retrieved(self, memory_kv: list | None, retrieved: torch.Tensor) -> list:
        """Prefix keys/values with retrieved tokens [L, r, d] or [B, L, r, d] placed right after the pool.

        The layout [bos, pool, retrieved, text] puts a retrieved entry where a fresh injection's tokens
        sit (the end of the pool, next to the text), so a model trained on fresh recall reads it without
        further training; the pool keeps its positions, so its cached keys/values are reused as they are.
        With no pool taking part the prefix is [bos, retrieved].
        """
        cached = self._retrieved_kv
        if (cached is not None and cached[0] is retrieved and cached[1] == retrieved._version
                and cached[2] is memory_kv and not torch.is_grad_enabled()):
            return cached[3]  # the next decoding step of the same generation
        self._retrieved_kv = None
        if memory_kv is None:
            combined = self._memory_kv_from(retrieved)
        else:
            combined = self._append_kv(memory_kv, retrieved)
        if not torch.is_grad_enabled():  # holding the tensors keeps their identity unique while cached
            self._retrieved_kv = (retrieved, retrieved._version, memory_kv, combined)
        return combined

    def _append_kv(self, memory_kv: list, retrieved: torch.Tensor) -> list:
        """memory_kv with the keys/values of `retrieved` rows at the positions right after it."""
        start = memory_kv[0][0].shape[2]
        positions = torch.arange(start, start + retrieved.shape[-2], device=retrieved.device)[None]
        cos, sin = self._position_embeddings(retrieved, positions)
        combined = []
        for i, (layer, (keys, values)) in enumerate(zip(self.model.layers, memory_kv, strict=True)):
            rows = retrieved[i][None] if retrieved.dim() == 3 else retrieved[:, i]  # (1 or B, r, d)
            new_keys, new_values = layer.prefix_kv(rows.to(keys.dtype), cos, sin)
            batch = max(keys.shape[0], new_keys.shape[0])
            combined.append((
                torch.cat([keys.expand(batch, -1, -1, -1), new_keys.expand(batch, -1, -1, -1)], dim=2),
                torch.cat([values.expand(batch, -1, -1, -1), new_values.expand(batch, -1, -1, -1)], dim=2),
            ))
        return combined

    # ----------------------------------------------------------------------------------------------- query

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        memory: torch.Tensor | None = None,
        use_memory_cache: bool | None = None,
        retrieved_memory: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """A query with the memory in front: logits (float32) for the text rows, loss if labels are given.

        input_ids: (B, T); attention_mask: (B, past + T) over the text only (0 = padding), optional;
        past_key_values: a DynamicCache of text keys/values (created when use_cache); memory: an explicit
        pool [L, n, d] to query instead of the model's own, or one pool per row [B, L, n, d]
        (differentiable: training uses it);
        use_memory_cache: override `self.use_memory_cache` (the cache is used only without autograd);
        retrieved_memory: memory tokens brought back from the bank, [L, r, d] for every row or [B, L, r, d]
        one set per row, laid out after the pool: [bos, pool, retrieved, text] (see `_with_retrieved`).
        Other keyword arguments transformers passes (return_dict, ...) are accepted and ignored.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if kwargs.get("position_ids") is not None:
            raise ValueError("MemoryLLM numbers positions itself (memory first); do not pass position_ids")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        hidden = inputs_embeds  # (B, T, d)
        batch, length, _ = hidden.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past_length + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, expected past + new = "
                f"{past_length + length} (the mask covers the text only, not the memory)"
            )

        memory_kv = self._query_memory_kv(memory, use_memory_cache)
        if retrieved_memory is not None:
            memory_kv = self._with_retrieved(memory_kv, retrieved_memory)
        self._activate_adapter(injection=False)
        prefix_length = memory_kv[0][0].shape[2] if memory_kv is not None else 0
        padding_mask = (
            attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        )
        if padding_mask is not None:
            # left padding: real tokens are numbered from the prefix on, as without padding
            positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:] + prefix_length
        else:
            positions = torch.arange(length, device=hidden.device)[None] + (prefix_length + past_length)
        position_embeddings = self._position_embeddings(hidden, positions)
        mask = attention_mask_for(padding_mask, past_length, length, prefix_length, hidden.device)

        for i, layer in enumerate(self.model.layers):
            prefix_kv = memory_kv[i] if memory_kv is not None else None
            hidden = layer(hidden, position_embeddings, prefix_kv, mask, past_key_values)
        hidden = self.model.norm(hidden)

        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device)
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    # ------------------------------------------------------------------------------------------- injection

    def _context_ids(
        self, context_ids: torch.Tensor, context_attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One context as (1, T) on the model's device; clear errors for what injection cannot take."""
        if context_ids.dim() == 1:
            context_ids = context_ids[None]
        if context_ids.dim() != 2 or context_ids.shape[0] != 1:
            raise ValueError(
                f"inject one context at a time: got context_ids of shape {tuple(context_ids.shape)}"
            )
        length = context_ids.shape[1]
        if length == 0:
            raise ValueError("cannot inject an empty context")
        if length > self.config.max_context_tokens:
            config = self.config
            raise ValueError(
                f"context of {length} tokens is longer than the model's window allows for injection "
                f"({config.max_context_tokens} = max_position_embeddings {config.max_position_embeddings}"
                f" - {config.num_tokens} memory tokens - bos); split it into shorter contexts"
            )
        if context_attention_mask is not None and not bool(context_attention_mask.all()):
            raise ValueError(
                "padded contexts are not supported by injection; pass the context without padding"
            )
        return context_ids.to(self.model.embed_tokens.weight.device)

    def _add_new_memory_embedding(self, rows: torch.Tensor) -> torch.Tensor:
        """rows + new_memory_positional_emb on the last K rows (all rows if there are fewer)."""
        k = self.config.num_tokens
        emb = self.new_memory_positional_emb.to(rows.dtype)
        if rows.shape[1] <= k:
            return rows + emb
        return torch.cat([rows[:, :-k], rows[:, -k:] + emb], dim=1)

    def new_memory_tokens(
        self,
        context_ids: torch.Tensor,
        context_attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The injection forward: new memory tokens [L, k, d] for one context, k = K (k = min(K, T) for an
        uninitialised pool). Reads the last K tokens of `memory` (default: the model's pool); changes
        nothing; differentiable when autograd is on."""
        ids = self._context_ids(context_ids, context_attention_mask)
        k = self.config.num_tokens
        use_pool = memory is not None or bool(self.initialized)
        pool = memory if memory is not None else self.memory
        self._activate_adapter(injection=True)

        hidden = self.model.embed_tokens(ids)  # (1, T, d)
        length = hidden.shape[1]
        full_prefix = int(self.config.add_bos_embedding) + k if use_pool else 0
        total = full_prefix + length
        prefix_length = min(full_prefix, total - k) if use_pool else 0  # rows that are only keys/values
        positions = torch.arange(total, device=hidden.device)[None]
        cos, sin = self._position_embeddings(hidden, positions)  # (1, S, head_dim)
        query_embeddings = (cos[:, prefix_length:], sin[:, prefix_length:])
        mask = attention_mask_for(None, prefix_length, total - prefix_length, 0, hidden.device)

        new_tokens = []
        for i, layer in enumerate(self.model.layers):
            rows = hidden
            if use_pool:
                rows = torch.cat([self._prefix_rows(pool[:, -k:], i).to(hidden.dtype), hidden], dim=1)
            rows = self._add_new_memory_embedding(rows)  # (1, S, d)
            prefix_kv = None
            if prefix_length:
                prefix_kv = layer.prefix_kv(
                    rows[:, :prefix_length], cos[:, :prefix_length], sin[:, :prefix_length]
                )
            out = layer(rows[:, prefix_length:], query_embeddings, prefix_kv, mask)  # (1, S - P, d)
            layer_tokens = out[0, -k:]
            if not use_pool and i < len(self.model.layers) - 1:
                # reference quirk: without a pool its next layer adds the embedding in place to a view of
                # this output, which its returned tokens alias; every layer's but the last carry it
                layer_tokens = layer_tokens + self.new_memory_positional_emb[0].to(layer_tokens.dtype)
            new_tokens.append(layer_tokens)
            hidden = out[:, -length:]
        return torch.stack(new_tokens)  # (L, k, d)

    def updated_memory(
        self,
        context_ids: torch.Tensor,
        context_attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The pool [L, N, d] after injecting one context into `memory` (default: the model's pool), without
        changing the model: the functional path for training (gradients flow into later queries that pass
        it as `forward(memory=...)`). An explicit `memory` counts as initialised."""
        new_tokens, dropped = self.memory_update(context_ids, context_attention_mask, memory, generator)
        pool = memory if memory is not None else self.memory
        return memory_pool.replayed_pool(pool, new_tokens, dropped)

    def memory_update(
        self,
        context_ids: torch.Tensor,
        context_attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What injecting one context into `memory` (default: the model's pool) changes, without changing
        it: the new tokens [L, K, d] in the pool's dtype and the indices to drop ([K], or [L, K] with
        drop_memory_per_layer), or None when the update fills an empty pool by tiling. Apply it with
        `memory_pool.replayed_pool`; recorded, it replays the update exactly (the memory bank does)."""
        new_tokens = self.new_memory_tokens(context_ids, context_attention_mask, memory)
        initialized = memory is not None or bool(self.initialized)
        pool = memory if memory is not None else self.memory
        dropped = memory_pool.next_drop(
            pool, new_tokens.shape[1], initialized, self.config.drop_memory_per_layer, generator
        )
        return new_tokens.to(pool.dtype), dropped

    def batched_updated_memory(
        self,
        context_ids: torch.Tensor,
        lengths: torch.Tensor,
        pools: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training path: inject B right-padded contexts (B, T) of `lengths` tokens, one into each of the
        initialised pools [B, L, N, d]; returns the updated pools. Row b equals
        `updated_memory(context_ids[b, :lengths[b]], memory=pools[b])` (same drop rules and generator)."""
        k = self.config.num_tokens
        self._activate_adapter(injection=True)
        hidden = self.model.embed_tokens(context_ids)  # (B, T, d)
        batch, length, _ = hidden.shape
        prefix = int(self.config.add_bos_embedding) + k
        positions = torch.arange(prefix + length, device=hidden.device)[None]
        position_embeddings = self._position_embeddings(hidden, positions)
        mask = attention_mask_for(None, 0, prefix + length, 0, hidden.device)  # causal over [prefix, text]
        # the last K real rows of [bos, pool[-K:], text] become the new tokens; they carry the marker
        last_rows = (prefix + lengths.to(hidden.device))[:, None] - k + torch.arange(k, device=hidden.device)
        marked = torch.zeros(batch, prefix + length, 1, device=hidden.device, dtype=hidden.dtype)
        marked = marked.scatter(1, last_rows[:, :, None], 1.0)
        gather_index = last_rows[:, :, None].expand(-1, -1, hidden.shape[-1])
        new_tokens = []
        for i, layer in enumerate(self.model.layers):
            rows = torch.cat([self._prefix_rows(pools[:, :, -k:], i).to(hidden.dtype), hidden], dim=1)
            rows = rows + marked * self.new_memory_positional_emb.to(hidden.dtype)
            out = layer(rows, position_embeddings, None, mask)  # (B, prefix + T, d)
            new_tokens.append(out.gather(1, gather_index))
            hidden = out[:, prefix:]
        new_tokens = torch.stack(new_tokens, dim=1)  # (B, L, K, d)
        return torch.stack([
            memory_pool.updated_pool(pool, tokens, True, self.config.drop_memory_per_layer, generator)
            for pool, tokens in zip(pools, new_tokens, strict=True)
        ])

    def inject_memory(
        self,
        context_ids: torch.Tensor,
        context_attention_mask: torch.Tensor | None = None,
        update_memory: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Self-update with one context (T or 1 x T token ids); returns its new memory tokens [L, k, d].

        With update_memory, K random pool tokens are dropped (same indices for all layers, or per layer
        with config.drop_memory_per_layer), the survivors keep their order and the new K are appended; an
        uninitialised pool is filled by tiling. Randomness comes from `generator` (default: torch's global
        CPU generator, as in the reference). The stored pool never carries a graph.
        """
        new_tokens = self.new_memory_tokens(context_ids, context_attention_mask)
        if update_memory:
            with torch.no_grad():
                pool = memory_pool.updated_pool(
                    self.memory,
                    new_tokens.detach(),
                    bool(self.initialized),
                    self.config.drop_memory_per_layer,
                    generator,
                )
            self._set_pool(pool, self.num_injections + 1, initialized=True)
        return new_tokens

    # ---------------------------------------------------------------------------------------- memory state

    def _set_pool(self, pool: torch.Tensor, num_injections: int, initialized: bool) -> None:
        if pool.shape != self.memory.shape:
            raise ValueError(
                f"memory pool of shape {tuple(pool.shape)} does not fit {tuple(self.memory.shape)}"
            )
        pool = pool.detach().to(device=self.memory.device, dtype=self.memory.dtype)
        if pool.is_inference():  # made under torch.inference_mode: keep the pool usable by autograd later
            with torch.inference_mode(False):
                pool = pool.clone()
        self.memory.data = pool
        self.initialized.fill_(int(initialized))
        self.num_injections = num_injections
        self.pool_generation += 1
        self.clear_memory_cache()

    def memory_state(self) -> MemoryState:
        """A copy of the pool [L, N, d] with its generation, number of injections and initialised flag."""
        return MemoryState(
            pool=self.memory.detach().clone(),
            generation=self.pool_generation,
            num_injections=self.num_injections,
            initialized=bool(self.initialized),
        )

    def set_memory_state(self, state: MemoryState) -> None:
        """Replace the pool by `state`'s (a rollback); the generation moves on (+1), injections as given."""
        self._set_pool(state.pool, state.num_injections, state.initialized)

    def save_memory_state(self, path: str | os.PathLike) -> str:
        """Write the pool and its bookkeeping as safetensors (atomic); returns the recorded SHA-256."""
        state = MemoryState(
            self.memory.detach(), self.pool_generation, self.num_injections, bool(self.initialized)
        )
        return save_state(state, path)

    def load_memory_state(self, path: str | os.PathLike) -> MemoryState:
        """Load a memory-state file after verifying its checksum (MemoryStateError otherwise); returns the
        state as recorded in the file. The live generation counter moves on (+1)."""
        state = load_state(path)
        self.set_memory_state(state)
        return state


AutoConfig.register(MemoryLLMConfig.model_type, MemoryLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLLMConfig, MemoryLLM, exist_ok=True)
