"""End-to-end ingestion rate (Kafka -> ckl ingest -> ckl serve) next to the model's raw injection rate.

    python bench/pipeline.py [--docs 200] [--batch-size 32] [--model model/default] [--probe-questions 10]

Starts its own Kafka and MLflow (in a temporary state dir) and a `ckl serve`, publishes the documents,
drains them with the ingestion step and prints documents/s; then injects the same documents' contexts
in process with `MemoryLLM.inject_memory` and prints that rate and the ratio (the pipeline should keep
at least 80% of it). Set OMP_NUM_THREADS to give both the same number of torch threads.
"""

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

# run as `python bench/pipeline.py`, this folder comes first on sys.path and bench/model.py would shadow
# the `model` package: put the repository root first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import (  # noqa: E402
    documents,
    ingest_settings,
    local_services,
    markdown_table,
    model_server,
    publish,
)
from model import DEFAULT_CHECKPOINT  # noqa: E402
from pipelines.ingest import batches_until_drained  # noqa: E402
from pipelines.kafka_io import DOCS_TOPIC  # noqa: E402


def pipeline_rate(docs: list, checkpoint: Path, state: Path, batch_size: int,
                  probe_questions: int) -> tuple[float, float, float, float]:
    """Documents/s through Kafka, HTTP, the bank's appends and the retention probes: from the first poll to
    the last commit, and in steady state (after the first batch, which also pays the consumer's group join,
    the first MLflow import and connection, and the server's first append); and the probes' share of the
    batches' time, and the model's injections' share of it (the rest is Kafka, HTTP, the bank's append,
    the ledger and the commit)."""
    token = secrets.token_urlsafe(12)
    with local_services(state) as info, model_server(checkpoint, state, token) as server:
        publish(info["kafka_bootstrap"], DOCS_TOPIC, docs)
        settings = ingest_settings(info, server, token, batch_size, probe_questions)
        started, applied, first, probe_ms, batch_ms, inject_ms = time.perf_counter(), 0, None, 0.0, 0.0, 0.0
        for report in batches_until_drained(settings):
            applied += report.applied
            probe_ms, batch_ms = probe_ms + report.probe_ms, batch_ms + report.seconds * 1000
            inject_ms += report.injection_ms
            finished = time.perf_counter()
            first = first or (finished, report.applied)
        if applied != len(docs):
            raise RuntimeError(f"applied {applied} of {len(docs)} documents")
        steady = (applied - first[1]) / (finished - first[0]) if finished > first[0] else float("nan")
        return applied / (finished - started), steady, probe_ms / batch_ms, inject_ms / batch_ms


def raw_rate(docs: list, checkpoint: Path) -> float:
    """Documents/s of `inject_memory` alone, in process, on the same documents' contexts."""
    from model import MemoryLLM
    from model.tokenizer import load_tokenizer

    tokenizer, model = load_tokenizer(checkpoint), MemoryLLM.from_pretrained(checkpoint).eval()
    size = model.config.max_context_tokens
    contexts = []
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False).input_ids
        contexts.append([torch.tensor(ids[i : i + size]) for i in range(0, len(ids), size)])
    with torch.no_grad():
        started = time.perf_counter()
        for doc_contexts in contexts:
            for context in doc_contexts:
                model.inject_memory(context)
        return len(docs) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="documents to ingest (default 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="messages per batch (default 32)")
    parser.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    parser.add_argument("--probe-questions", type=int, default=10,
                        help="retention probes per batch, as `ckl ingest` (default 10; 0: none)")
    args = parser.parse_args()
    docs = documents(args.docs)
    with tempfile.TemporaryDirectory(prefix="ckl-bench-") as state:
        overall, steady, probe_share, inject_share = pipeline_rate(docs, args.model, Path(state),
                                                                   args.batch_size, args.probe_questions)
    raw = raw_rate(docs, args.model)
    headers = ["documents", "batch", "probes per batch", "torch threads", "raw inject docs/s",
               "pipeline docs/s (all)", "pipeline / raw", "pipeline docs/s (after the first batch)",
               "pipeline / raw", "probe share of batch time", "injection share of batch time"]
    values = [len(docs), args.batch_size, args.probe_questions, torch.get_num_threads(), f"{raw:.1f}",
              f"{overall:.1f}", f"{overall / raw:.0%}", f"{steady:.1f}", f"{steady / raw:.0%}",
              f"{probe_share:.0%}", f"{inject_share:.0%}"]
    print(markdown_table(headers, [values]))


if __name__ == "__main__":
    main()
