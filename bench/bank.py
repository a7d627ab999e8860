"""The memory bank's costs, measured in one run: appends, bytes per document, slot reads, and the latency a
question pays for retrieval through the default model.

    python bench/bank.py [--entries 2000] [--model model/default]

Appends `--entries` entries of the model's shape (random tokens, biography texts) in batches of 32 to a
real bank in a temporary directory (one Lance commit per batch, as the server does), then: bytes on disk
per entry for each slot format, reading one entry's slots, and the answer latency of the default model
with retrieval (key search + slot read + generation with the entry after the pool) vs without. Bytes for
MemoryLLM-8B are computed from its shape. Retrieval keys (recall@k, top-k latency up to 1M entries):
bench/bank_keys.py and docs/bank_keys.md.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# run as `python bench/bank.py`, this folder comes first on sys.path and bench/model.py would shadow
# the `model` package: put the repository root first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from compression.bank import BankLayout, MemoryBank, NewEntry  # noqa: E402
from compression.retrieval import Retriever  # noqa: E402
from compression.settings import RetrievalSettings, SlotFormat  # noqa: E402
from model import DEFAULT_CHECKPOINT, memory_pool  # noqa: E402
from synthetic import bios  # noqa: E402

BATCH = 32
MIB = 2**20


def fill(bank: MemoryBank, texts: list[str], pool_size: int) -> float:
    """Append one entry per text in batches of BATCH; returns entries per second."""
    layout = bank.layout
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for first in range(0, len(texts), BATCH):
        entries = [
            NewEntry(f"doc-{i}", 0, texts[i],
                     torch.randn(layout.layers, layout.tokens, layout.hidden, generator=generator),
                     memory_pool.dropped_indices(pool_size, layout.tokens, layout.layers,
                                                 layout.drop_per_layer, generator),
                     source="bench", topic="ckl.docs", partition=0, offset=i)
            for i in range(first, min(first + BATCH, len(texts)))
        ]
        bank.append(entries, version=first // BATCH + 1)
    return len(texts) / (time.perf_counter() - started)


def parquet_baseline(bank: MemoryBank, root: Path, reads: int = 50) -> tuple[float, float]:
    """The same entries as Parquet files (one per batch, pyarrow): (entries/s written, median ms to read one
    entry's slots back by seq). The second candidate store, for comparison with Lance."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    table = bank.to_arrow()
    root.mkdir()
    started = time.perf_counter()
    for number, first in enumerate(range(0, table.num_rows, BATCH)):
        pq.write_table(table.slice(first, BATCH), root / f"batch-{number:06d}.parquet")
    rate = table.num_rows / (time.perf_counter() - started)
    dataset = ds.dataset(root, format="parquet")
    samples = []
    for seq in range(0, table.num_rows, max(1, table.num_rows // reads)):
        started = time.perf_counter()
        dataset.to_table(columns=["slots", "slot_scale"], filter=ds.field("seq") == seq)
        samples.append(time.perf_counter() - started)
    return rate, median_ms(samples)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000, help="entries to append (default 2000)")
    parser.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    parser.add_argument("--questions", type=int, default=40, help="questions timed (default 40)")
    args = parser.parse_args()

    from model import MemoryLLM
    from model.tokenizer import load_tokenizer
    from monitoring.retention import QueryRunner

    model = MemoryLLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    config = model.config
    documents = list(bios.bio_documents(args.entries, "heldout", 1))
    texts = [d.text for d in documents]

    print(f"## Appends and bytes ({args.entries} entries of {config.num_hidden_layers} x "
          f"{config.num_tokens} x {config.hidden_size} float32, batches of {BATCH})\n")
    print("| slot format | entries/s | bytes on disk per entry | of which exact tokens | after compaction |")
    print("|---|---:|---:|---:|---:|")
    exact = config.num_hidden_layers * config.num_tokens * config.hidden_size * 4
    with tempfile.TemporaryDirectory(prefix="ckl-bench-bank-") as root:
        for name, slot_format in [("float16, S = K", SlotFormat()), ("int8, S = K", SlotFormat(None, "int8")),
                                  ("float16, S = K/4", SlotFormat(config.num_tokens // 4))]:
            layout = BankLayout(config.num_hidden_layers, config.num_tokens, config.hidden_size, "float32",
                                config.drop_memory_per_layer, slot_format)
            bank = MemoryBank(Path(root) / name.replace(" ", "").replace(",", "-").replace("/", "_"), layout)
            rate = fill(bank, texts, config.pool_size)
            per_entry = bank.stats()["bytes_on_disk"] / len(bank)
            if slot_format == SlotFormat():  # the default: compare stores on its rows, before compaction
                default_bank_dir, default_rate = bank.uri, rate
                read = []
                for seq in range(0, len(bank), max(1, len(bank) // 50)):
                    started = time.perf_counter()
                    bank.slots([seq])
                    read.append(time.perf_counter() - started)
                parquet_rate, parquet_read = parquet_baseline(bank, Path(root) / "parquet")
            bank.compact(covered_seq=len(bank))
            compacted = bank.stats()["bytes_on_disk"] / len(bank)
            print(f"| {name} | {rate:.0f} | {per_entry / 1024:.0f} KiB | {exact / 1024:.0f} KiB | "
                  f"{compacted / 1024:.0f} KiB |")
        print("\n| store | append entries/s | read one entry's slots by seq (median ms) |\n|---|---:|---:|")
        print(f"| Lance (pylance, take by row) | {default_rate:.0f} | {median_ms(read):.2f} |")
        print(f"| Parquet (pyarrow, a file per batch, filter on seq) | {parquet_rate:.0f} | "
              f"{parquet_read:.2f} |")
        layers, k, hidden = 32, 256, 4096
        tokens_8b = layers * k * hidden * 2
        print(f"\nMemoryLLM-8B on paper (L={layers}, K={k}, d={hidden}, bfloat16 pool): exact tokens "
              f"{tokens_8b / MIB:.0f} MiB per entry; retrieval slots float16 S=K {tokens_8b / MIB:.0f} MiB, "
              f"int8 S=K {layers * k * (hidden + 2) / MIB:.0f} MiB, float16 S=K/4 "
              f"{tokens_8b / 4 / MIB:.0f} MiB; after compaction only the slots stay.\n")

        bank = MemoryBank(default_bank_dir)
        retriever = Retriever(bank, RetrievalSettings())
        runner = QueryRunner(model, tokenizer)
        for text in texts[-200:]:  # a full pool
            runner.inject(text)
        questions = [p.question for d in documents[: args.questions] for p in d.probes[:1]]
        without, with_bank, search = [], [], []
        for question in questions:
            started = time.perf_counter()
            runner.answer([question], 8)
            without.append(time.perf_counter() - started)
            started = time.perf_counter()
            retrieved = retriever.retrieve(question)
            search.append(time.perf_counter() - started)
            runner.answer([question], 8, [retrieved.tokens])
            with_bank.append(time.perf_counter() - started)

    print(f"## Query latency, default model, bank of {len(texts)} entries, top-1 "
          f"({len(questions)} questions, 8 new tokens, {torch.get_num_threads()} torch threads)\n")
    print("| | median ms |\n|---|---:|")
    print(f"| retrieve (key search + slot read) | {median_ms(search):.2f} |")
    print(f"| answer, pool alone | {median_ms(without):.1f} |")
    print(f"| answer with retrieval (all of it) | {median_ms(with_bank):.1f} |")
    print(f"| ratio | {statistics.median(with_bank) / statistics.median(without):.2f}x |")


if __name__ == "__main__":
    main()
