"""End-to-end ingestion rate (Kafka -> ckl ingest -> ckl serve) next to the model's raw injection rate.

    python bench/pipeline.py [--docs 200] [--batch-size 32] [--model model/default] [--probe-questions 10]

Starts its own Kafka and MLflow (in a temporary state dir) and a `ckl serve`, publishes the documents,
drains them with the ingestion step and prints documents/s; then injects the same documents' contexts
in process with `MemoryLLM.inject_memory` and prints that rate and the ratio (the pipeline should keep
at least 80% of it). Set OMP_NUM_THREADS to give both the same number of torch threads.
"""

import argparse
import os
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

# run as `python bench/pipeline.py`, this folder comes first on sys.path and bench/model.py would shadow
# the `model` package: put the repository root first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipelines.bios import bio_document, generate_people  # noqa: E402
from pipelines.ingest import IngestSettings, batches_until_drained  # noqa: E402
from pipelines.kafka_io import DOCS_TOPIC, DOCUMENT_TOPICS, ensure_topics, make_producer  # noqa: E402
from pipelines.services import LocalServices  # noqa: E402
from serving.process import DEFAULT_CHECKPOINT, ServerProcess  # noqa: E402


def documents(count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    people = generate_people(count, "heldout", seed)
    return [bio_document(person, rng, f"bench-{i:05d}") for i, person in enumerate(people)]


def pipeline_rate(docs: list, checkpoint: Path, state: Path, batch_size: int,
                  probe_questions: int) -> tuple[float, float, float]:
    """Documents/s through Kafka, HTTP, the bank's appends and the retention probes: from the first poll to
    the last commit, and in steady state (after the first batch, which also pays the consumer's group join,
    the first MLflow import and connection, and the server's first append); and the probes' share of the
    batches' time."""
    info = LocalServices(state).start()
    token = secrets.token_urlsafe(12)
    server = ServerProcess(checkpoint, state, write_token=token).start()
    try:
        ensure_topics(info["kafka_bootstrap"], DOCUMENT_TOPICS)
        producer = make_producer(info["kafka_bootstrap"])
        for doc in docs:
            producer.send(DOCS_TOPIC, value=doc.to_json().encode(), key=doc.doc_id.encode())
        producer.flush()
        producer.close()
        settings = IngestSettings(bootstrap=info["kafka_bootstrap"], server_url=server.url, write_token=token,
                                  mlflow_uri=info["mlflow_uri"], batch_size=batch_size, poll_timeout_s=3.0,
                                  probe_questions=probe_questions)
        started, applied, first, probe_ms, batch_ms = time.perf_counter(), 0, None, 0.0, 0.0
        for report in batches_until_drained(settings):
            applied += report.applied
            probe_ms, batch_ms = probe_ms + report.probe_ms, batch_ms + report.seconds * 1000
            finished = time.perf_counter()
            first = first or (finished, report.applied)
        if applied != len(docs):
            raise RuntimeError(f"applied {applied} of {len(docs)} documents")
        steady = (applied - first[1]) / (finished - first[0]) if finished > first[0] else float("nan")
        return applied / (finished - started), steady, probe_ms / batch_ms
    finally:
        server.stop()
        LocalServices(state).stop()


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
        overall, steady, probe_share = pipeline_rate(docs, args.model, Path(state), args.batch_size,
                                                     args.probe_questions)
    raw = raw_rate(docs, args.model)
    headers = ["documents", "batch", "probes per batch", "torch threads", "raw inject docs/s",
               "pipeline docs/s (all)", "pipeline / raw", "pipeline docs/s (after the first batch)",
               "pipeline / raw", "probe share of batch time"]
    values = [len(docs), args.batch_size, args.probe_questions, torch.get_num_threads(), f"{raw:.1f}",
              f"{overall:.1f}", f"{overall / raw:.0%}", f"{steady:.1f}", f"{steady / raw:.0%}",
              f"{probe_share:.0%}"]
    print("| " + " | ".join(headers) + " |\n|" + "---:|" * len(headers) + "\n| "
          + " | ".join(str(value) for value in values) + " |")


if __name__ == "__main__":
    main()
