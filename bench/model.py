"""Benchmark of the MemoryLLM's costs: injection vs a bare forward, and queries against pools of growing
size with and without the per-version memory K/V cache. Prints markdown tables.

    python bench/model.py [--quick] [--out docs/bench_model.md]

What it measures (random weights; the costs do not depend on what the model learned):
- injection: `inject_memory` of one context of T tokens into a pool of N tokens (the forward with bos + K
  pool tokens in front, plus the pool update) against a bare forward of the same T tokens without memory;
- queries: one forward of a short prompt and a short greedy generation, with the K/V cache (the pool's
  keys/values projected once per pool version: the first query after an update pays it) and without
  (projected again at every forward pass, as the reference implementation does), at N in {0, 1k, 4k, 16k}.
Times are medians over repeated runs, the cases taking turns; peak memory is the largest rise of the
process's resident memory during a case's warm-up run (sampled every millisecond; on CUDA, the
allocator's peak).
"""

import os
import sys

# run as `python bench/model.py`, this folder comes first on sys.path and this file would shadow the
# `model` package: look in the project folder first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import ctypes
import ctypes.util
import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model import MemoryLLM, MemoryLLMConfig, MemoryState
from model.distributed import resolve_device

POOL_SIZES = (0, 1024, 4096, 16384)
MIB = 2**20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class BenchConfig:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    memory_tokens: int  # K, tokens one injection writes per layer
    context_tokens: int  # T, tokens of the injected context
    prompt_tokens: int
    new_tokens: int
    repeats: int
    pool_sizes: tuple[int, ...]


def model_config(bench: BenchConfig, pool_size: int) -> MemoryLLMConfig:
    k = bench.memory_tokens
    return MemoryLLMConfig(
        vocab_size=bench.vocab,
        hidden_size=bench.hidden,
        intermediate_size=bench.intermediate,
        num_hidden_layers=bench.layers,
        num_attention_heads=bench.heads,
        num_key_value_heads=bench.kv_heads,
        max_position_embeddings=1 + k + bench.context_tokens + bench.prompt_tokens + bench.new_tokens,
        num_tokens=k,
        num_blocks=max(pool_size // k, 1),
        num_memory_tokens=max(pool_size, k),
        eos_token_id=None,
    )


def build_model(bench: BenchConfig, pool_size: int, device: torch.device, dtype: torch.dtype) -> MemoryLLM:
    """Random weights (same seed for every N); a random pool of N tokens, or an empty one for N = 0."""
    torch.manual_seed(0)
    model = MemoryLLM(model_config(bench, pool_size)).to(device=device, dtype=dtype).eval()
    if pool_size:
        pool = torch.randn(model.memory.shape, generator=torch.Generator().manual_seed(1))
        model.set_memory_state(MemoryState(pool=pool, generation=0, num_injections=0, initialized=True))
    return model


# ------------------------------------------------------------------------------------------- measuring


class PeakMemory:
    """Largest rise of memory in use over its level at entry: resident set size sampled every millisecond
    on the CPU, the caching allocator's peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _release_free_memory() -> None:
        """Hand freed heap memory back to the OS, so reusing it shows up as a rise (glibc only)."""
        gc.collect()
        libc_name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc_name) if libc_name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._release_free_memory()
            self._start = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.peak_mib = (peak - self._start) / MIB


@dataclass(frozen=True)
class Measurement:
    ms: float  # median over repeats
    peak_mib: float


def measure(
    cases: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, Measurement]:
    """Median wall time of each case over `repeats` timed rounds, after a warm-up round that measures its
    memory rise (apart: releasing memory first would put page faults into the times). The cases take
    turns within a round, so a change of load on the machine (other jobs) hits them alike."""
    peaks = {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for name, fn in cases.items():
            with PeakMemory(device) as peak:
                fn()
            peaks[name] = peak.peak_mib
        for _ in range(repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: Measurement(statistics.median(times[name]), peaks[name]) for name in cases}


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class InjectionRow:
    pool_size: int
    bare_forward: Measurement
    injection: Measurement


@dataclass(frozen=True)
class QueryRow:
    pool_size: int
    pool_mib: float
    cache_mib: float
    projection: Measurement | None  # the pool's keys/values for all layers (one cache build)
    forward: dict[bool, Measurement]  # use_memory_cache -> measurement
    generate: dict[bool, Measurement]


def random_ids(length: int, bench: BenchConfig, seed: int, device: torch.device) -> torch.Tensor:
    """(1, length) random token ids."""
    return torch.randint(bench.vocab, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)


def injection_row(model: MemoryLLM, bare_model: MemoryLLM, bench: BenchConfig) -> InjectionRow:
    """`inject_memory` of a context (forward with bos + K pool tokens in front, then the pool update),
    taking turns with a bare forward of the same tokens on a model without memory (logits of the last
    token only)."""
    device = model.memory.device
    context = random_ids(bench.context_tokens, bench, 2, device)
    generator = torch.Generator().manual_seed(3)
    measured = measure(
        {
            "bare": lambda: bare_model(context, use_cache=False, logits_to_keep=1),
            "injection": lambda: model.inject_memory(context, generator=generator),
        },
        bench.repeats,
        device,
    )
    return InjectionRow(model.config.pool_size, measured["bare"], measured["injection"])


def query_row(model: MemoryLLM, bench: BenchConfig) -> QueryRow:
    """One cache build, then a forward and a generation of the prompt with and without the K/V cache."""
    device = model.memory.device
    pool_size = model.config.pool_size if model.initialized else 0
    prompt = random_ids(bench.prompt_tokens, bench, 4, device)
    mask = torch.ones_like(prompt)
    projection = None
    if pool_size:

        def build_cache() -> None:
            model.clear_memory_cache()
            model.memory_kv()

        projection = measure({"projection": build_cache}, bench.repeats, device)["projection"]

    def forward(cached: bool) -> None:
        model(prompt, attention_mask=mask, use_cache=False, use_memory_cache=cached)

    def generate(cached: bool) -> None:
        model.use_memory_cache = cached  # generate's forward passes read it
        model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=bench.new_tokens,
            min_new_tokens=bench.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        model.use_memory_cache = True

    measured = measure(
        {
            "forward cached": lambda: forward(True),
            "forward uncached": lambda: forward(False),
            "generate cached": lambda: generate(True),
            "generate uncached": lambda: generate(False),
        },
        bench.repeats,
        device,
    )
    cache_mib = sum(k.nbytes + v.nbytes for k, v in model.memory_kv()) / MIB if pool_size else 0.0
    pool_mib = model.memory.nbytes / MIB if pool_size else 0.0
    return QueryRow(
        pool_size,
        pool_mib,
        cache_mib,
        projection,
        {cached: measured[f"forward {'cached' if cached else 'uncached'}"] for cached in (True, False)},
        {cached: measured[f"generate {'cached' if cached else 'uncached'}"] for cached in (True, False)},
    )


# ---------------------------------------------------------------------------------------------- report


def size(n: int) -> str:
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def injection_table(bench: BenchConfig, rows: list[InjectionRow]) -> str:
    header = [
        "pool N",
        f"bare forward, T={bench.context_tokens} (ms)",
        "injection (ms)",
        "injection / forward",
        "peak forward (MiB)",
        "peak injection (MiB)",
    ]
    return markdown_table(
        header,
        [
            [
                size(row.pool_size),
                f"{row.bare_forward.ms:.1f}",
                f"{row.injection.ms:.1f}",
                f"{row.injection.ms / row.bare_forward.ms:.2f}x",
                f"{row.bare_forward.peak_mib:.0f}",
                f"{row.injection.peak_mib:.0f}",
            ]
            for row in rows
        ],
    )


def query_table(bench: BenchConfig, rows: list[QueryRow]) -> str:
    header = [
        "pool N",
        "pool / K/V cache (MiB)",
        "pool K/V projection (ms)",
        "forward cached (ms)",
        "forward uncached (ms)",
        "speed-up",
        f"generate {bench.new_tokens} cached (ms)",
        f"generate {bench.new_tokens} uncached (ms)",
        "speed-up",
        "peak cached / uncached (MiB)",
    ]
    return markdown_table(
        header,
        [
            [
                size(row.pool_size),
                f"{row.pool_mib:.0f} / {row.cache_mib:.0f}",
                f"{row.projection.ms:.1f}" if row.projection else "-",
                f"{row.forward[True].ms:.1f}",
                f"{row.forward[False].ms:.1f}",
                f"{row.forward[False].ms / row.forward[True].ms:.1f}x",
                f"{row.generate[True].ms:.1f}",
                f"{row.generate[False].ms:.1f}",
                f"{row.generate[False].ms / row.generate[True].ms:.1f}x",
                f"{max(row.forward[True].peak_mib, row.generate[True].peak_mib):.0f} / "
                f"{max(row.forward[False].peak_mib, row.generate[False].peak_mib):.0f}",
            ]
            for row in rows
        ],
    )


def growth_summary(rows: list[QueryRow]) -> str:
    """What the largest pool adds to a forward, with and without the cache, next to its projection; and
    the noise floor: without a pool, cached and uncached run the same code."""
    smallest, largest = rows[0], rows[-1]
    cached = largest.forward[True].ms - smallest.forward[True].ms
    uncached = largest.forward[False].ms - smallest.forward[False].ms
    text = (
        f"From N={size(smallest.pool_size)} to N={size(largest.pool_size)}, a forward of the prompt costs "
        f"{cached:.1f} ms more with the cache (attention over the cached keys) and {uncached:.1f} ms more "
        f"without it, where the pool's projection alone takes {largest.projection.ms:.1f} ms."
    )
    if smallest.pool_size == 0:
        times = [smallest.forward[True].ms, smallest.forward[False].ms]
        text += (
            f" At N=0 both columns run the same code: their gap ({max(times) / min(times) - 1:.0%}) is the "
            f"timing noise of this run."
        )
    return text


def report(
    bench: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    injections: list[InjectionRow],
    queries: list[QueryRow],
) -> str:
    b = bench
    setup = (
        f"Model: {b.layers} layers, d={b.hidden}, {b.heads} heads ({b.kv_heads} key/value), "
        f"MLP {b.intermediate}, vocab {b.vocab}, K={b.memory_tokens} tokens per injection; random weights. "
        f"{device.type}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}. Medians of {b.repeats} runs, the cases of a table row taking turns; peak = "
        f"largest rise of {'allocated' if device.type == 'cuda' else 'resident'} memory during a warm-up run."
    )
    return (
        f"{setup}\n\n"
        f"**Injection** of one context of T={b.context_tokens} tokens into a pool of N tokens (forward with "
        f"bos + K pool tokens in front, then the pool update), against a bare forward of the same tokens "
        f"without memory (logits of the last token only).\n\n"
        f"{injection_table(bench, injections)}\n\n"
        f"**Queries**: a prompt of {b.prompt_tokens} tokens; one forward, and a greedy generation of "
        f"{b.new_tokens} tokens. Cached: the pool's keys/values are projected once per pool version (the "
        f"projection column; paid by the first query after an update); uncached: projected again at every "
        f"forward pass, as the reference implementation does.\n\n{query_table(bench, queries)}\n\n"
        f"{growth_summary(queries)}\n"
    )


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller pools and fewer repeats (a smoke run)")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5, 1 with --quick)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    bench = BenchConfig(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.hidden // 64,
        kv_heads=args.hidden // 64,
        intermediate=args.hidden * 11 // 4,
        vocab=8192,
        memory_tokens=256,
        context_tokens=256,
        prompt_tokens=16,
        new_tokens=8,
        repeats=args.repeats or (1 if args.quick else 5),
        pool_sizes=POOL_SIZES[:3] if args.quick else POOL_SIZES,
    )
    injections, queries = [], []
    bare_model = build_model(bench, 0, device, dtype)
    for pool_size in tqdm(bench.pool_sizes, desc="pool sizes", unit="N"):
        model = build_model(bench, pool_size, device, dtype)
        queries.append(query_row(model, bench))
        if pool_size:
            injections.append(injection_row(model, bare_model, bench))
        del model
    text = report(bench, device, dtype, injections, queries)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# MemoryLLM costs (`python bench/model.py`)\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
