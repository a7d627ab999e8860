"""End-to-end ingestion rate (Kafka -> ckl ingest -> ckl serve) next to the model's raw injection rate.

    python bench/pipeline.py [--docs 200] [--batch-size 32] [--model model/default]

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


def pipeline_rate(docs: list, checkpoint: Path, state: Path, batch_size: int) -> float:
    """Documents/s from the first poll to the last commit, through Kafka, HTTP and the bank's appends."""
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
                                  mlflow_uri=info["mlflow_uri"], batch_size=batch_size, poll_timeout_s=3.0)
        started, applied = time.perf_counter(), 0
        for report in batches_until_drained(settings):
            applied += report.applied
            finished = time.perf_counter()
        if applied != len(docs):
            raise RuntimeError(f"applied {applied} of {len(docs)} documents")
        return applied / (finished - started)
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
    args = parser.parse_args()
    docs = documents(args.docs)
    with tempfile.TemporaryDirectory(prefix="ckl-bench-") as state:
        pipeline = pipeline_rate(docs, args.model, Path(state), args.batch_size)
    raw = raw_rate(docs, args.model)
    print(f"| documents | batch | torch threads | pipeline docs/s | raw inject docs/s | pipeline / raw |\n"
          f"|---:|---:|---:|---:|---:|---:|\n"
          f"| {len(docs)} | {args.batch_size} | {torch.get_num_threads()} | {pipeline:.1f} | {raw:.1f} "
          f"| {pipeline / raw:.0%} |")


if __name__ == "__main__":
    main()
