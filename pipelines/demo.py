"""The main job end to end on the embedded default (`make demo`).

Starts Kafka and MLflow, starts the model server with the default model, publishes synthetic
biographies (with probes) plus a few bad messages to `ckl.docs`, runs the `ckl_ingest` DAG until the
topic is drained, asks the probes' questions over HTTP and prints the answers next to the truth.
The services and the server stay up afterwards so you can explore; `ckl services down` and
`ckl serve --stop` stop them.
"""

import argparse
import json
import random
import secrets
import sys
import time
from pathlib import Path

from pipelines.airflow_env import airflow_environment, migrate, run_dag
from pipelines.bios import bio_document, generate_people
from pipelines.ingest import SERVER_URL_ENV
from pipelines.kafka_io import DLQ_TOPIC, DOCS_TOPIC, consumer_lag, topic_size
from pipelines.paths import state_dir
from pipelines.services import LocalServices
from pipelines.source import DEFAULT_GROUP
from serving.client import ModelServerClient
from serving.process import DEFAULT_CHECKPOINT, ServerProcess, stop_running_server
from serving.settings import WRITE_TOKEN_ENV

BAD_MESSAGES = (
    b"this is not json",
    b'{"doc_id": "bad-no-text"}',
    b'{"doc_id": "", "text": "an empty doc_id"}',
    b'{"doc_id": "bad-types", "text": 42}',
    b'\xff\xfe not UTF-8',
)


def step(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def write_stream(path: Path, people: int, seed: int) -> list[dict]:
    """A JSONL stream of biographies with probes, bad messages mixed in; returns the valid documents."""
    rng = random.Random(seed)
    run_id = f"{seed:x}"
    documents = [json.loads(bio_document(person, rng, f"demo-{run_id}-{i:04d}").to_json())
                 for i, person in enumerate(generate_people(people, "heldout", seed))]
    lines = [json.dumps(d).encode() for d in documents]
    for bad in BAD_MESSAGES:
        lines.insert(rng.randrange(len(lines) + 1), bad)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return documents


def ask_probes(client: ModelServerClient, documents: list[dict], show: int) -> tuple[int, int]:
    """Ask every probe; print the last `show` published documents' answers next to the truth; (right, asked).

    Kafka's partitions interleave the documents, so the order they were injected in is not the order
    they were published in: `last` counts back in publishing order only."""
    from model.prompts import answers_match

    right = asked = 0
    print(f"{'last':>4}  {'question':<58} {'answer':<22} truth")
    for age, document in enumerate(reversed(documents)):
        for probe in document["probes"]:
            answer = client.query(probe["question"], max_new_tokens=12).answer
            ok = answers_match(answer, probe["answer"])
            right, asked = right + ok, asked + 1
            if age < show:
                mark = "ok" if ok else "  "
                print(f"{age:>4}  {probe['question'][:58]:<58} {answer[:22]:<22} {probe['answer']}  {mark}")
    return right, asked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=40, help="biographies to publish (default: 40)")
    parser.add_argument("--batch-size", type=int, default=16, help="messages per DAG run (default: 16)")
    parser.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    parser.add_argument("--seed", type=int, default=None, help="stream seed (default: a new one per run)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    total, started = 6, time.monotonic()
    state = state_dir()

    step(1, total, "Starting Kafka (ZooKeeper + broker) and the MLflow server")
    info = LocalServices(state).start()
    print(f"  kafka {info['kafka_bootstrap']}   mlflow {info['mlflow_uri']}")

    step(2, total, f"Starting the model server with {args.model}")
    token = secrets.token_urlsafe(16)
    stop_running_server(state)
    server = ServerProcess(args.model, state, write_token=token, detach=True).start()
    print(f"  serving at {server.url} (pid {server.process.pid}, log {server.log_path})")

    step(3, total, f"Publishing {args.people} biographies and {len(BAD_MESSAGES)} bad messages")
    stream = state / "demo" / f"stream-{seed:x}.jsonl"
    documents = write_stream(stream, args.people, seed)
    bootstrap = info["kafka_bootstrap"]
    produce = ServerProcess.run_ckl(["produce", DOCS_TOPIC, str(stream), "--bootstrap", bootstrap])
    print("  " + produce.stdout.strip().splitlines()[-1])

    step(4, total, "Running the ckl_ingest DAG (one batch per run) until the topic is drained")
    environment = airflow_environment(state / "airflow")
    environment |= {WRITE_TOKEN_ENV: token, SERVER_URL_ENV: server.url}
    migrate(environment)
    dead_letters_before = topic_size(bootstrap, DLQ_TOPIC)
    runs = 0
    while (lag := consumer_lag(info["kafka_bootstrap"], DOCS_TOPIC, DEFAULT_GROUP)) > 0:
        runs += 1
        print(f"  run {runs}: {lag} messages waiting", flush=True)
        run_dag("ckl_ingest", environment, conf={"batch_size": args.batch_size})
    with ModelServerClient(server.url) as client:
        memory = client.memory()
        print(f"  drained after {runs} runs: {memory.documents_applied} documents applied, "
              f"{memory.injections} contexts injected, memory version {memory.memory_version}; "
              f"{topic_size(bootstrap, DLQ_TOPIC) - dead_letters_before} messages sent to {DLQ_TOPIC}")

        step(5, total, "Asking the probes' questions over HTTP (last = position from the end of what was "
                       "published; the 3 partitions interleave the injection order)")
        right, asked = ask_probes(client, documents, show=3)
    print(f"  exact match: {right}/{asked} = {right / max(asked, 1):.0%} over all {len(documents)} people "
          "(recall fades after ~12 later injections: README, 'The default model')")

    step(6, total, "Where to look")
    print(f"  MLflow UI:    {info['mlflow_uri']}  (experiment ckl-ingest: one run per batch)")
    print(f"  model server: {server.url}/docs  (OpenAPI)")
    print(f"  dead letters: topic {DLQ_TOPIC} (reason and source offset in the headers)")
    print("  stop with:    .venv/bin/ckl serve --stop && .venv/bin/ckl services down")
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
