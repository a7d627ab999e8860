"""One rank of a tensor-parallel engine run: tests/test_engine.py starts two, as `deepspeed` would.

Hosts a checkpoint with tensor_parallel=2 on the CPU, then writes what it computed to OUT/rank<RANK>.pt:
query logits (memory K/V cache on and off), the new memory tokens of a context, the pool after an update,
and a greedy generation. Each rank seeds torch differently first: the engine must make the pools agree.
"""

import argparse
import os
from pathlib import Path

import torch

from model.engine import EngineConfig, load_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()

    rank = int(os.environ["RANK"])
    torch.manual_seed(1000 + rank)
    hosted = load_engine(
        args.checkpoint,
        EngineConfig(dtype="float32", tensor_parallel=2, device="cpu", cache_dir=args.cache_dir),
    )
    query = torch.tensor([[7, 8, 9, 10, 11]])
    context = torch.arange(3, 13)[None]
    with torch.no_grad():
        results = {
            "logits": hosted(query).logits,
            "logits_uncached": hosted(query, use_memory_cache=False).logits,
            "new_tokens": hosted.model.new_memory_tokens(context),
            "generated": hosted.generate(query, max_new_tokens=6, do_sample=False),
        }
        hosted.model.inject_memory(context)
        results["pool_after_update"] = hosted.model.memory.detach().clone()
        results["logits_after_update"] = hosted(query).logits
    results["world_size"] = torch.distributed.get_world_size()
    results["q_proj_rows"] = hosted.model.model.layers[0].self_attn.q_proj.base_layer.weight.shape[0]
    torch.save(results, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
