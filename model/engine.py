"""A MemoryLLM hosted by DeepSpeed inference (`deepspeed.init_inference`): what a model server runs.

Device, dtype and tensor-parallel size come from an `EngineConfig`, so the same code hosts the small CPU
model of this project and a released MemoryLLM-7B/8B checkpoint from a local path on GPU workers
(`deepspeed --num_gpus 2 ...` with tensor_parallel=2).

- Kernel injection stays off: the decoder layers are MemoryLLM's own (memory prefix in attention).
- With tensor_parallel > 1, DeepSpeed's AutoTP shards every MemoryDecoderLayer by an explicit policy:
  q/k/v and gate/up by output rows, o/down by input columns with an all-reduce, and the lm_head. LoRA
  adapters (released checkpoints may carry two: injection and decoder) are sharded here to match their
  base layer, because AutoTP would shard them as if they were ordinary layers. The memory pool, bos
  embedding and norms stay whole on every rank; each rank computes the pool's keys/values of its heads.
- Injections draw the dropped pool tokens from torch's CPU generator; with tensor_parallel > 1 its state
  is made equal on all ranks, so every rank keeps the same pool.
- RoPE frequencies stay float32 in every dtype (as `from_pretrained` keeps them): DeepSpeed's cast would
  round them, which shifts the rotation of the thousands of positions of a released pool.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.distributed import prepare_distributed_env, resolve_device
from model.memoryllm import LoraLinear, MemoryDecoderLayer, MemoryLLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """How to host a MemoryLLM.

    dtype: "auto" (the model's own, for a checkpoint the dtype it was saved in), "float32", "float16" or
    "bfloat16". tensor_parallel: ranks one model is sharded over (run under the `deepspeed` launcher with
    that many processes). device: None for this rank's GPU when there is one, else the CPU. cache_dir:
    where DeepSpeed's JIT-built ops go (cache_dir/torch_extensions); pass the project's cache.
    """

    dtype: str = "auto"
    tensor_parallel: int = 1
    device: str | None = None
    cache_dir: Path | None = None

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, not {self.dtype!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be at least 1, not {self.tensor_parallel}")


class RowParallelLoraDown(nn.Module):
    """LoRA's A matrix next to a row-parallel base layer: this rank's input columns, summed over ranks."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (r, in / tp)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import deepspeed.comm as dist

        out = F.linear(x, self.weight)  # this rank's part of A @ x
        dist.inference_all_reduce(out, group=self.group)
        return out


def detach_lora(model: nn.Module) -> list[tuple[LoraLinear, nn.ModuleDict, nn.ModuleDict]]:
    """Take every LoRA adapter out of the model (AutoTP then shards the base layers only)."""
    detached = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            detached.append((module, module.lora_A, module.lora_B))
            module.lora_A, module.lora_B = nn.ModuleDict(), nn.ModuleDict()
    return detached


def attach_sharded_lora(detached: list[tuple[LoraLinear, nn.ModuleDict, nn.ModuleDict]]) -> None:
    """Put the adapters back, sharded as AutoTP sharded their base layer: B by output rows next to a
    column-parallel base, A by input columns (plus an all-reduce) next to a row-parallel one."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    for module, lora_a, lora_b in detached:
        base = module.base_layer
        if not isinstance(base, (LinearLayer, LinearAllreduce)):
            raise RuntimeError(f"AutoTP left {type(base).__name__} unsharded; cannot shard its LoRA adapters")
        like = base.weight
        lora_a.to(device=like.device, dtype=like.dtype)
        lora_b.to(device=like.device, dtype=like.dtype)
        for name in lora_a:
            if isinstance(base, LinearAllreduce):  # (r, in) -> this rank's input columns
                columns = lora_a[name].weight.data.split(base._partition_sizes, dim=1)[base.tp_index]
                lora_a[name] = RowParallelLoraDown(columns.contiguous(), base.mp_group)
            else:  # (out, r) -> this rank's output rows
                up = lora_b[name]
                rows = up.weight.data.split(base._partition_sizes, dim=0)[base.tp_index]
                up.weight.data, up.out_features = rows.contiguous(), rows.shape[0]
        module.lora_A, module.lora_B = lora_a, lora_b


def row_parallel_names(model: MemoryLLM) -> tuple[str, ...]:
    """AutoTP's names of the linear layers whose input is sharded (o_proj, down_proj), LoRA or not."""
    layer = model.model.layers[0]
    names = []
    for path, module in (
        ("self_attn.o_proj", layer.self_attn.o_proj),
        ("mlp.down_proj", layer.mlp.down_proj),
    ):
        # AutoTP names a layer by its parent and itself: a LoRA-wrapped one is "<name>.base_layer"
        names.append(path.split(".")[-1] + ".base_layer" if isinstance(module, LoraLinear) else path)
    return tuple(names)


def synchronise_cpu_rng(group, device: torch.device) -> None:
    """Give every rank of `group` rank 0's CPU generator state (the pool's drop indices come from it)."""
    import deepspeed.comm as dist

    state = torch.get_rng_state().to(device)  # NCCL broadcasts device tensors only
    dist.broadcast(state, src=0, group=group)
    torch.set_rng_state(state.cpu())


class HostedMemoryLLM:
    """A MemoryLLM behind a DeepSpeed InferenceEngine.

    `forward` and `generate` run through the engine; `model` is the MemoryLLM underneath (the same module
    the engine runs) for injections and the memory state: `hosted.model.inject_memory(ids)`,
    `hosted.model.memory_state()`, `hosted.model.load_memory_state(path)`. The model passed in is
    converted and moved in place; with tensor_parallel > 1 it is sharded (and no longer savable whole).
    """

    def __init__(self, model: MemoryLLM, config: EngineConfig = EngineConfig()):
        self.config = config
        device = resolve_device(config.device)
        prepare_distributed_env(config.cache_dir, device)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        if accelerator.device_name() != device.type:
            raise RuntimeError(
                f"DeepSpeed already runs on its {accelerator.device_name()} accelerator in this process "
                f"(DS_ACCELERATOR); it cannot host a model on {device}"
            )
        if device.index is not None:
            accelerator.set_device(device.index)
        dtype = model.dtype if config.dtype == "auto" else DTYPES[config.dtype]
        tensor_parallel = config.tensor_parallel
        kwargs = {}
        detached = []
        if tensor_parallel > 1:
            self._check_world(tensor_parallel, device)
            detached = detach_lora(model)
            kwargs["injection_policy"] = {MemoryDecoderLayer: row_parallel_names(model)}
        rope = {name: buffer.clone() for name, buffer in model.model.rotary_emb.named_buffers()}

        self.engine = deepspeed.init_inference(
            model,
            dtype=dtype,
            tensor_parallel={"tp_size": tensor_parallel},
            replace_with_kernel_inject=False,
            max_tokens=model.config.max_position_embeddings,
            **kwargs,
        )
        self.model: MemoryLLM = self.engine.module
        self.device = self.model.model.embed_tokens.weight.device
        self.dtype = dtype
        for name, buffer in rope.items():
            setattr(self.model.model.rotary_emb, name, buffer.to(self.device))
        if tensor_parallel > 1:
            attach_sharded_lora(detached)
            synchronise_cpu_rng(self.engine.mp_group, self.device)
        self.model.eval()

    @staticmethod
    def _check_world(tensor_parallel: int, device: torch.device) -> None:
        world_size = int(os.environ["WORLD_SIZE"])
        if world_size < tensor_parallel:
            raise RuntimeError(
                f"tensor_parallel={tensor_parallel} needs that many processes, but WORLD_SIZE={world_size}: "
                f"start it with `deepspeed --num_gpus {tensor_parallel} ...`"
            )
        if device.type == "cpu" and "LOCAL_SIZE" not in os.environ:
            raise RuntimeError("set LOCAL_SIZE (ranks on this machine): DeepSpeed's CPU all-reduce needs it")

    def forward(self, input_ids: torch.Tensor, **kwargs) -> CausalLMOutputWithPast:
        """MemoryLLM.forward through the engine (memory in front; kwargs such as attention_mask,
        past_key_values, use_memory_cache=False as there)."""
        return self.engine(input_ids=input_ids.to(self.device), **kwargs)

    __call__ = forward

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """transformers' generate through the engine, with the memory in front of the prompt."""
        input_ids = input_ids.to(self.device)
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.device)
        return self.engine.generate(input_ids, **kwargs)


def load_engine(checkpoint: str | Path, config: EngineConfig = EngineConfig()) -> HostedMemoryLLM:
    """A MemoryLLM checkpoint (ckl's or a released one, local path) hosted as `config` says.

    The weights are read on the CPU in the target dtype and moved (sharded, with tensor_parallel > 1) to
    the device by DeepSpeed.
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"no MemoryLLM checkpoint at {checkpoint} (config.json missing)")
    dtype = "auto" if config.dtype == "auto" else DTYPES[config.dtype]
    model = MemoryLLM.from_pretrained(checkpoint, dtype=dtype)
    return HostedMemoryLLM(model, config)
