"""Benchmark of the memory bank's retrieval keys (compression.keys): accuracy and cost, as markdown tables.

    python bench/bank_keys.py [--quick] [--seed 0] [--device DEVICE]

What it measures, in one run (--quick: smaller sizes, for smoke use):
1. recall@1 and recall@5: N held-out biographies are N entries (ids 0..N-1); the queries are a sample of
   their probe questions, the right entry is the biography of the person asked about. N = 1k and 10k,
   and the questions of tests/data/foreign_docs.jsonl with those documents mixed into the 10k. Kinds:
   bm25, dense (exact, and IVF), hybrid (RRF). Every text and question is encoded by MiniLM once.
2. top-k (k=4) latency: single-query calls (median, p99) and batches of 64 (queries/s), with the build
   time, at 10k, 100k and 1M entries. bm25 indexes biographies (held-out split up to 150k, train split
   beyond: the held-out split has 160k people). dense indexes random unit vectors (384-d) searched by
   random unit vectors: index cost only; the MiniLM encoding of a query is measured on its own, and
   end to end (encoding included) for dense and hybrid at the recall size.
3. appends of 32 entries to an index of 100k (bm25 incl. its periodic rebuilds; dense: MiniLM encoding
   plus the faiss add).
"""

import os
import sys

# run as `python bench/bank_keys.py`, this folder comes first on sys.path: put the repository first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torch and faiss each bring an OpenMP runtime; busy-waiting idle threads of one slow the other down (and
# everything else on a loaded machine: MiniLM encoding of one query measured 420 ms instead of 20 ms)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import torch

from compression.keys import BM25Index, DenseIndex, Hits, HybridIndex, MiniLMEncoder, default_device
from documents.model import Document
from documents.parse import parse_document
from synthetic import bios

FOREIGN_DOCS = Path(__file__).resolve().parents[1] / "tests" / "data" / "foreign_docs.jsonl"
K = 4
DEPTH = 50  # what each part gives the hybrid fusion
NPROBE = 16
DIM = 384
TARGET_MS = 20.0


@dataclass(frozen=True)
class Sizes:
    recall_n: tuple[int, ...]
    questions: int
    latency_n: tuple[int, ...]
    latency_queries: int
    append_base: int
    appends: int
    encodings: int  # appends whose 32 texts MiniLM encodes


FULL = Sizes(recall_n=(1_000, 10_000), questions=2_000, latency_n=(10_000, 100_000, 1_000_000),
             latency_queries=200, append_base=100_000, appends=400, encodings=10)
QUICK = Sizes(recall_n=(200, 500), questions=300, latency_n=(1_000, 10_000, 20_000),
              latency_queries=50, append_base=10_000, appends=100, encodings=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="MiniLM device (default: cuda if available, else cpu)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    device = args.device or default_device()
    encoder = MiniLMEncoder(device)
    started = time.perf_counter()
    print(f"# Retrieval keys (`python bench/bank_keys.py{' --quick' if args.quick else ''}`)\n")
    print(f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), MiniLM on {device}; faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"bm25s {bm25s.__version__}, numpy {np.__version__}. Seed {args.seed}. k={K} unless stated; "
          f"IVF: faiss IndexIVFFlat, nlist = sqrt(N), nprobe = {NPROBE}; hybrid: RRF (k=60) of the best "
          f"{DEPTH} of bm25 and of dense (exact). OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}. "
          f"Load average at the start: {load_average()}.\n")
    docs, doc_vectors = recall_section(sizes, encoder, args.seed)
    latency_section(sizes, args.seed)
    end_to_end(docs, doc_vectors, sizes.latency_queries, encoder)
    append_section(sizes, encoder, args.seed)
    print(f"Total run time: {time.perf_counter() - started:.0f} s; load average at the end: "
          f"{load_average()}.")


# ---------------------------------------------------------------- 1. recall


def recall_section(sizes: Sizes, encoder: MiniLMEncoder, seed: int) -> tuple[list[Document], np.ndarray]:
    """Prints the recall table; returns the biographies and their embeddings."""
    rng = random.Random(seed)
    docs = list(bios.bio_documents(max(sizes.recall_n), "heldout", seed))
    started = time.perf_counter()
    doc_vectors = encoder([doc.text for doc in docs])
    encode_s = time.perf_counter() - started
    rows = []
    for n in sizes.recall_n:
        pairs = rng.sample([(i, probe.question) for i, doc in enumerate(docs[:n]) for probe in doc.probes],
                           min(sizes.questions, 5 * n))
        targets, questions = [i for i, _ in pairs], [q for _, q in pairs]
        rows += recall_rows(f"{n:,} held-out bios", [d.text for d in docs[:n]], doc_vectors[:n],
                            questions, targets, encoder)
    lines = FOREIGN_DOCS.read_text().splitlines()
    foreign = [parse_document(line.encode()) for line in lines if line.strip()]
    mixed, targets, questions = mix_in(docs, foreign)
    all_vectors = np.concatenate([doc_vectors, encoder([doc.text for doc in foreign])])
    row_of = {id(doc): i for i, doc in enumerate([*docs, *foreign])}
    rows += recall_rows(f"{len(docs):,} held-out bios + {len(foreign)} foreign docs (foreign questions)",
                        [doc.text for doc in mixed], all_vectors[[row_of[id(doc)] for doc in mixed]],
                        questions, targets, encoder)
    print("## Recall: does the top of the ranking hold the entry of the person asked about?\n")
    print(f"MiniLM encoded the {len(docs):,} biographies in {encode_s:.0f} s "
          f"({len(docs) / encode_s:.0f} texts/s).\n")
    print(table(["entries", "questions", "key", "recall@1", "recall@5"], rows))
    return docs, doc_vectors


def mix_in(docs: list[Document], foreign: list[Document]) -> tuple[list[Document], list[int], list[str]]:
    """The foreign documents spread evenly among the biographies; their questions and entry positions."""
    mixed = list(docs)
    for j, doc in enumerate(foreign):
        mixed.insert((j + 1) * len(mixed) // (len(foreign) + 1), doc)
    where = {id(doc): i for i, doc in enumerate(mixed)}
    pairs = [(where[id(doc)], probe.question) for doc in foreign for probe in doc.probes]
    return mixed, [i for i, _ in pairs], [q for _, q in pairs]


def recall_rows(label: str, texts: list[str], vectors: np.ndarray, questions: list[str], targets: list[int],
                encoder: MiniLMEncoder) -> list[list[str]]:
    ids = range(len(texts))
    bm25 = BM25Index()
    bm25.add(ids, texts)
    dense = DenseIndex(encoder)
    dense.add_vectors(ids, vectors)
    query_vectors = encoder(questions)
    lexical_hits = bm25.search(questions, DEPTH)
    dense_hits = dense.search_vectors(query_vectors, DEPTH)
    results = {
        "bm25": lexical_hits,
        "dense (exact)": dense_hits,
        "hybrid": HybridIndex(bm25, dense).fuse(lexical_hits, dense_hits, 5),
    }
    nlist = ivf_nlist(len(texts))
    ivf = DenseIndex(encoder, ann="ivf", nlist=nlist, nprobe=NPROBE)
    ivf.add_vectors(ids, vectors)
    if ivf.is_ivf:
        results[f"dense (IVF, nlist={nlist})"] = ivf.search_vectors(query_vectors, 5)
    rows = []
    for name, hits in results.items():
        top1 = np.mean([bool(h) and h[0][0] == t for h, t in zip(hits, targets, strict=True)])
        top5 = np.mean([t in [entry for entry, _ in h[:5]] for h, t in zip(hits, targets, strict=True)])
        rows.append([label, f"{len(questions):,}", name, f"{top1:.3f}", f"{top5:.3f}"])
    return rows


def ivf_nlist(n: int) -> int:
    """sqrt(n) lists, fewer when n is too small to train them (39 points per list)."""
    return max(1, min(round(math.sqrt(n)), n // 39))


# ---------------------------------------------------------------- 2. latency


def latency_section(sizes: Sizes, seed: int) -> None:
    rows = []
    for n in sizes.latency_n:
        rows.append(bm25_latency(n, sizes.latency_queries, seed))
        vectors, queries = random_unit_vectors(n, seed), random_unit_vectors(sizes.latency_queries, seed + 1)
        rows += [dense_latency(ann, vectors, queries) for ann in ("flat", "ivf")]
        del vectors
    print("## Latency of a top-k search\n")
    print(f"Top-{K} per query; single = one query per call ({sizes.latency_queries} queries), batch = calls "
          f"of 64 queries. bm25 texts: biographies (held-out split up to 150k entries, train split beyond); "
          f"questions: probes of indexed people. dense rows: random unit vectors ({DIM}-d) as entries and "
          f"queries, the index alone (no encoding; recall on random vectors means nothing, see the recall "
          f"table for IVF on real embeddings). Memory: growth of the process's resident memory while "
          f"building.\n")
    print(table(["index", "entries", "build (s)", "memory (MB)", "single median (ms)", "single p99 (ms)",
                 "batch-64 (queries/s)"], rows))
    largest = f"{max(sizes.latency_n):,}"
    fast = [row[0] for row in rows if row[1] == largest and float(row[4]) < TARGET_MS]
    print(f"Under {TARGET_MS:.0f} ms per single query (median) at {largest} entries: "
          f"{'; '.join(fast) if fast else 'none'}.\n")


def bm25_latency(n: int, queries: int, seed: int) -> list[str]:
    texts, questions = bio_corpus(n, queries, seed)
    index = BM25Index()
    build = measure_build(lambda: index.add(range(n), texts))
    return ["bm25", f"{n:,}", *build, *measure_search(index.search, questions)]


def dense_latency(ann: str, vectors: np.ndarray, queries: np.ndarray) -> list[str]:
    nlist = ivf_nlist(len(vectors))
    index = DenseIndex(lambda texts: np.zeros((0, DIM)), ann=ann, nlist=nlist, nprobe=NPROBE, dim=DIM)
    build = measure_build(lambda: index.add_vectors(range(len(vectors)), vectors))
    name = "dense, exact (IndexFlatIP)" if ann == "flat" else f"dense, IVF (nlist={nlist}, nprobe={NPROBE})"
    return [name, f"{len(vectors):,}", *build, *measure_search(index.search_vectors, queries)]


def end_to_end(docs: list[Document], doc_vectors: np.ndarray, queries: int, encoder: MiniLMEncoder) -> None:
    """Query encoding alone, and bm25/dense/hybrid searches with it, on real biographies and embeddings."""
    n = len(docs)
    questions = [doc.probes[1].question for doc in docs[:queries]]
    bm25, dense = BM25Index(), DenseIndex(encoder)
    bm25.add(range(n), [doc.text for doc in docs])
    dense.add_vectors(range(n), doc_vectors)
    rows = [
        ["MiniLM query encoding alone", "-", *measure_search(lambda qs, k: encoder(qs), questions)],
        ["bm25", f"{n:,}", *measure_search(bm25.search, questions)],
        ["dense, exact, encoding included", f"{n:,}", *measure_search(dense.search, questions)],
        ["hybrid, encoding included", f"{n:,}", *measure_search(HybridIndex(bm25, dense).search, questions)],
    ]
    print(f"End to end on {encoder.device or default_device()} (held-out biographies, MiniLM embeddings):\n")
    print(table(["search", "entries", "single median (ms)", "single p99 (ms)", "batch-64 (queries/s)"], rows))


def bio_corpus(n: int, queries: int, seed: int) -> tuple[list[str], list[str]]:
    """n biographies and the probe questions of `queries` random people among them."""
    split = "heldout" if n <= 150_000 else "train"
    docs = bios.bio_documents(n, split, seed)
    rng = random.Random(seed)
    asked = set(rng.sample(range(n), queries))
    texts, questions = [], []
    for i, doc in enumerate(docs):
        texts.append(doc.text)
        if i in asked:
            questions.append(rng.choice(doc.probes).question)
    rng.shuffle(questions)
    return texts, questions


def random_unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        chunk = rng.standard_normal((min(100_000, n - start), DIM), dtype=np.float32)
        vectors[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def measure_build(build: Callable[[], None]) -> list[str]:
    rss = resident_mb()
    started = time.perf_counter()
    build()
    return [f"{time.perf_counter() - started:.1f}", f"{resident_mb() - rss:.0f}"]


def measure_search(search: Callable[[Sequence, int], list[Hits]], queries: Sequence) -> list[str]:
    search(queries[:2], K)  # warm-up
    single = []
    for i in range(len(queries)):
        started = time.perf_counter()
        search(queries[i : i + 1], K)
        single.append(time.perf_counter() - started)
    batches = []
    for start in range(0, max(len(queries) - 63, 1), 64):
        started = time.perf_counter()
        search(queries[start : start + 64], K)
        batches.append(time.perf_counter() - started)
    per_batch = min(64, len(queries))
    return [f"{1e3 * statistics.median(single):.2f}", f"{1e3 * float(np.percentile(single, 99)):.2f}",
            f"{per_batch / statistics.median(batches):,.0f}"]


def load_average() -> str:
    return " / ".join(f"{load:.1f}" for load in os.getloadavg()) + " (1 / 5 / 15 min)"


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------- 3. appends


def append_section(sizes: Sizes, encoder: MiniLMEncoder, seed: int) -> None:
    base, batch = sizes.append_base, 32
    docs = list(bios.bio_documents(base + batch * sizes.appends, "heldout", seed))
    texts = [doc.text for doc in docs]
    index = BM25Index()
    started = time.perf_counter()
    index.add(range(base), texts[:base])
    build_s = time.perf_counter() - started
    appends, searches, rebuilds = [], [], index.rebuilds
    for start in range(base, len(texts), batch):
        began = time.perf_counter()
        index.add(range(start, start + batch), texts[start : start + batch])
        appends.append(time.perf_counter() - began)
        began = time.perf_counter()
        index.search([docs[start].probes[0].question], K)
        searches.append(time.perf_counter() - began)
    rebuilds = index.rebuilds - rebuilds
    began = time.perf_counter()
    index.rebuild()
    rebuild_s = time.perf_counter() - began

    dense = DenseIndex(encoder, dim=DIM)
    dense.add_vectors(range(base), random_unit_vectors(base, seed))
    ivf = DenseIndex(encoder, ann="ivf", nlist=ivf_nlist(base), nprobe=NPROBE, dim=DIM)
    ivf.add_vectors(range(base), random_unit_vectors(base, seed))
    encode, add_flat, add_ivf = [], [], []
    for n, start in enumerate(range(base, len(texts), batch)):
        if n < sizes.encodings:
            began = time.perf_counter()
            encoder(texts[start : start + batch])
            encode.append(time.perf_counter() - began)
        vectors = random_unit_vectors(batch, seed + start)
        for target, times in ((dense, add_flat), (ivf, add_ivf)):
            began = time.perf_counter()
            target.add_vectors(range(start, start + batch), vectors)
            times.append(time.perf_counter() - began)

    def ms(values: list[float]) -> list[str]:
        return [f"{1e3 * statistics.median(values):.1f}", f"{1e3 * statistics.mean(values):.1f}",
                f"{1e3 * max(values):.1f}"]

    rows = [
        ["bm25: add (tokenize, count; the rebuilds when due)", *ms(appends)],
        ["bm25: first search after the add (builds the tail's postings)", *ms(searches)],
        ["dense: MiniLM encoding of the 32 texts", *ms(encode)],
        ["dense, exact: faiss add", *ms(add_flat)],
        [f"dense, IVF (nlist={ivf_nlist(base)}): faiss add", *ms(add_ivf)],
    ]
    print(f"## Appending {batch} entries at a time to an index of {base:,}\n")
    print(f"{sizes.appends} appends of {batch} biographies ({base:,} to {len(texts):,} entries), each "
          f"followed by one bm25 search. bm25 rebuilt its main part {rebuilds} times (when the tail outgrew "
          f"5% of it); a full rebuild over all {len(texts):,} entries takes {rebuild_s:.1f} s (building "
          f"the first {base:,}, tokenizing included: {build_s:.1f} s). MiniLM encoding: the first "
          f"{sizes.encodings} appends.\n")
    print(table(["step, per append of 32", "median (ms)", "mean (ms)", "max (ms)"], rows))


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                                range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
