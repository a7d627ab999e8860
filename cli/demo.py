"""The main job end to end on the embedded default (`make demo`).

Starts Kafka and MLflow, starts the model server with the default model, publishes synthetic
biographies (with probes) plus a few bad messages to `ckl.docs`, runs the `ckl_ingest` DAG until the
topic is drained, asks the probes' questions over HTTP from the memory pool alone and with retrieval
from the memory bank, prints both answers next to the truth, and writes the retention dashboard.
The services and the server stay up afterwards so you can explore; `ckl services down` and
`ckl serve --stop` stop them.
"""

import argparse
import json
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

from cli.argtypes import positive_int, seed_number
from localservices.airflow import airflow_environment, migrate, run_dag
from localservices.stack import LocalServices
from model import DEFAULT_CHECKPOINT
from monitoring.tracking import experiment_name
from pipelines.kafka_io import consumer_lag, topic_size
from pipelines.report import publish
from pipelines.settings import DEFAULT_GROUP, DLQ_TOPIC, DOCS_TOPIC, SERVER_URL_ENV
from runtime.paths import state_dir
from serving.client import ModelServerClient
from serving.process import ServerProcess, ckl_command, stop_running_server
from serving.settings import WRITE_TOKEN_ENV
from synthetic.bios import bio_document, generate_people

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


def ask_probes(client: ModelServerClient, documents: list[dict], show: int) -> tuple[int, int, int]:
    """Ask every probe from the pool alone and with bank retrieval; print the answers about the first and
    the last `show` published documents next to the truth; returns (right from pool, right with bank, asked).

    Kafka's partitions interleave the documents, so the order they were injected in is not the order
    they were published in: `#` is the position in publishing order."""
    from model.prompts import answers_match

    pool_right = bank_right = asked = 0
    print(f"{'#':>3}  {'question':<52} {'pool alone':<28} {'with bank':<28} truth")
    for position, document in enumerate(documents):
        shown = position < show or position >= len(documents) - show
        for probe in document["probes"]:
            pool = client.query(probe["question"], max_new_tokens=16, retrieve=False).answer
            bank = client.query(probe["question"], max_new_tokens=16).answer
            pool_ok, bank_ok = answers_match(pool, probe["answer"]), answers_match(bank, probe["answer"])
            pool_right, bank_right, asked = pool_right + pool_ok, bank_right + bank_ok, asked + 1
            if shown:
                print(f"{position:>3}  {probe['question'][:52]:<52} {_marked(pool, pool_ok):<28} "
                      f"{_marked(bank, bank_ok):<28} {probe['answer']}")
        if position == show - 1 and len(documents) > 2 * show:
            print(f"{'...':>3}")
    return pool_right, bank_right, asked


def _marked(answer: str, ok: bool) -> str:
    return f"{answer} {'ok' if ok else 'x'}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=positive_int, default=40,
                        help="biographies to publish (default: 40)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="messages per DAG run (default: 16)")
    parser.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint directory")
    parser.add_argument("--seed", type=seed_number, default=None,
                        help="stream seed (default: a new one per run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    total, started = 6, time.monotonic()
    state = state_dir()

    step(1, total, "Starting Kafka (ZooKeeper + broker) and the MLflow server")
    info = LocalServices(state).start()
    print(f"  kafka {info['kafka_bootstrap']}   mlflow {info['mlflow_uri']}")

    step(2, total, f"Starting the model server with {args.model}")
    token = secrets.token_urlsafe(16)
    token_file = state / "demo" / "write_token"  # for commands that write after the demo (ingest, rollback)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    stop_running_server(state)
    server = ServerProcess(args.model, state, write_token=token).start()
    print(f"  serving at {server.url} (pid {server.pid}, log {server.log_path})")
    with ModelServerClient(server.url) as client:
        earlier = client.memory()
    if earlier.documents_applied:
        print(f"  restored from {state}: {earlier.documents_applied} documents applied by earlier runs "
              f"(memory version {earlier.memory_version}); this run adds to them "
              "(`make clean` starts afresh)")

    step(3, total, f"Publishing {args.people} biographies and {len(BAD_MESSAGES)} bad messages")
    stream = state / "demo" / f"stream-{seed:x}.jsonl"
    documents = write_stream(stream, args.people, seed)
    bootstrap = info["kafka_bootstrap"]
    produce = subprocess.run([ckl_command(), "produce", DOCS_TOPIC, str(stream), "--bootstrap", bootstrap],
                             capture_output=True, text=True, check=True)
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
        applied = memory.documents_applied - earlier.documents_applied
        dead_lettered = topic_size(bootstrap, DLQ_TOPIC) - dead_letters_before
        in_all = f" ({memory.documents_applied} in memory in all)" if earlier.documents_applied else ""
        print(f"  drained after {runs} runs: {applied} documents applied, "
              f"{memory.injections - earlier.injections} contexts injected, memory version "
              f"{memory.memory_version}; {dead_lettered} messages sent to {DLQ_TOPIC}{in_all}")

        step(5, total, "Asking the probes' questions over HTTP, from the pool alone and with the memory bank "
                       "(# = position in publishing order; the 3 partitions interleave the injection order)")
        pool_right, bank_right, asked = ask_probes(client, documents, show=2)
    print(f"  exact match over all {len(documents)} people: pool alone {pool_right}/{asked} = "
          f"{pool_right / max(asked, 1):.0%} (the pool forgets after ~12 later injections), with the memory "
          f"bank {bank_right}/{asked} = {bank_right / max(asked, 1):.0%}")

    step(6, total, "Writing the retention dashboard from MLflow; where to look")
    report = state / "report.html"
    alerts = publish(report, mlflow_uri=info["mlflow_uri"])
    print(f"  dashboard:    {report}  ({'ALERT: ' + '; '.join(alerts) if alerts else 'retention OK'})")
    print(f"  MLflow UI:    {info['mlflow_uri']}  (experiment {experiment_name()}: a run per memory lineage, "
          "a nested run per batch)")
    print(f"  model server: {server.url}/docs  (OpenAPI)")
    print(f"  dead letters: topic {DLQ_TOPIC} (reason and source offset in the headers)")
    print("  memory bank:  .venv/bin/ckl bank stats  (and `ckl bank ls`, `ckl bank show DOC_ID`)")
    print(f"  writes:       export CKL_WRITE_TOKEN=$(cat {token_file})  (for ckl ingest, ckl rollback)")
    print("  rollback:     .venv/bin/ckl snapshots list, .venv/bin/ckl rollback VERSION --replay|--skip")
    print("  stop with:    .venv/bin/ckl serve --stop && .venv/bin/ckl services down")
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
