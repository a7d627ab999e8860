"""Queries under ingestion: latency, throughput and errors of `POST /v1/query` from C concurrent clients
while documents stream through Kafka -> the ingestion step -> `ckl serve`, and whether every document
arrived.

    python bench/load.py [--clients 50,200] [--docs 256] [--json PATH]      (every flag: --help)

Starts its own Kafka and MLflow (`ckl services up`, in a temporary state dir). Then, for each level C of
--clients, after a level C = 0 (the ingestion alone; --no-baseline skips it): starts a fresh `ckl serve` of
--model (empty memory, its own bank), publishes --docs biographies to a fresh topic, and runs the ingestion
step (`pipelines.ingest.batches_until_drained`, what `ckl ingest --until-drained` and bench/pipeline.py
run) in a thread while C asyncio clients (one httpx.AsyncClient, a connection per client) send
POST /v1/query, each a probe question about one of the published people with --max-new-tokens, each
client sending its next request when its previous one completed (closed loop; after an error it waits
0.1 s). The clients stop when the last document is applied (or after --duration); in-flight requests
finish. Bounds: --timeout per request, --time-limit per level (the ingestion stops after its current
batch then, and what it did not consume is reported as left in Kafka).

Per level: the load window (s), queries completed, queries/s (completed within the window / window),
latency p50 / p99 / max in ms (client side: from sending the request to the whole answer), the server's
own time per query (from its /metrics: waiting for the model's turn + retrieval + generation; the rest of
the client latency is queueing in front of the handler), errors by kind (HTTP status or exception class),
the memory versions the answers came from (they advance while the queries run: the queries ran during
the ingestion), and how long GET /v1/health took meanwhile (asked once a second on a connection of its
own: what a load balancer's health check would see). For the ingestion: documents published (acknowledged
by Kafka), applied (the server's GET /v1/memory), left in Kafka (the consumer group's lag) and lost
(published and committed by the ingestion yet not applied: must be 0), its documents/s (first poll to
last commit) against the level without queries, and per batch its seconds next to the server's own time
injecting and probing (the rest is the consumer, MLflow, and waiting for the server to take the request).
Prints two markdown tables; --json PATH also writes every number. Exits 1 if a document was lost or the
ingestion failed.

Everything runs on this machine: the clients share the CPU with Kafka, MLflow, the ingestion and the
server.
"""

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

# run as `python bench/load.py`, this folder comes first on sys.path and bench/model.py would shadow the
# `model` package: put the repository root first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from bench.harness import (  # noqa: E402
    documents,
    ingest_settings,
    local_services,
    markdown_table,
    model_server,
    publish,
)
from documents.model import Document  # noqa: E402
from model import DEFAULT_CHECKPOINT  # noqa: E402
from pipelines.ingest import batches_until_drained  # noqa: E402
from pipelines.kafka_io import consumer_lag  # noqa: E402
from pipelines.settings import IngestSettings  # noqa: E402
from serving.schemas import MemoryResponse, QueryRequest, QueryResponse  # noqa: E402

ERROR_PAUSE_S = 0.1  # a client waits this long after an error, so a refusing server is not hammered
DRAIN_MARGIN_S = 5.0  # in-flight requests get their timeout plus this to finish after the window
TIMELINE_STEP_S = 10.0  # the JSON's latency timeline: one bucket per this many seconds of completion time
HEALTH_EVERY_S = 1.0  # GET /v1/health this often during the window, on a connection of its own


@dataclass
class Queries:
    """What the clients of one level saw."""

    latencies_s: list[float] = field(default_factory=list)  # of every successful query
    finished_at: list[float] = field(default_factory=list)  # when each of them completed (perf_counter)
    in_window: int = 0  # successful queries that completed before the clients were told to stop
    errors: Counter[str] = field(default_factory=Counter)  # "HTTP 503", "ReadTimeout", ...
    versions: set[int] = field(default_factory=set)  # memory versions the answers came from
    health_s: list[float] = field(default_factory=list)  # latencies of the health checks


@dataclass
class Ingestion:
    """What the ingestion step did in one level."""

    applied: int = 0
    batches: int = 0
    seconds: float = 0.0  # from the start to the last commit
    batch_done_s: list[float] = field(default_factory=list)  # when each batch was committed, from the start
    injection_ms: float = 0.0  # the server's time computing the batches (model turns shared with queries)
    probe_ms: float = 0.0  # the server's time running the retention probes
    drained: bool = False  # an empty poll ended it (not the time limit, not an error)
    error: str | None = None

    @property
    def docs_per_s(self) -> float:
        return self.applied / self.seconds if self.seconds else math.nan


@dataclass
class Level:
    """One row of the result table."""

    clients: int
    window_s: float
    queries: int
    queries_per_s: float
    latency_ms: dict[str, float]
    server_ms_per_query: float
    health_ms: dict[str, float]  # GET /v1/health during the window: p50, max, count
    timeline: list[dict[str, float]]  # per TIMELINE_STEP_S of completion time: queries, p50 and max (ms)
    errors: dict[str, int]
    server_errors: dict[str, int]
    memory_versions: list[int]  # [lowest, highest] the answers came from; [] with no answer
    final_memory_version: int
    published: int
    applied: int
    left_in_kafka: int
    lost: int
    ingestion: Ingestion

    def to_dict(self) -> dict:
        ingestion = asdict(self.ingestion) | {"docs_per_s": self.ingestion.docs_per_s}
        return asdict(self) | {"ingestion": ingestion}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; nan when there is no value."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def timeline(seen: Queries, origin: float) -> list[dict[str, float]]:
    """The successful queries by when they completed (TIMELINE_STEP_S buckets from `origin`): how latency
    moves while batches and probes run (compare with the ingestion's batch_done_s)."""
    buckets: dict[int, list[float]] = {}
    for finished, latency in zip(seen.finished_at, seen.latencies_s, strict=True):
        buckets.setdefault(int((finished - origin) // TIMELINE_STEP_S), []).append(latency)
    return [{"until_s": (bucket + 1) * TIMELINE_STEP_S, "queries": len(values),
             "p50_ms": round(1000 * percentile(values, 50)), "max_ms": round(1000 * max(values))}
            for bucket, values in sorted(buckets.items())]


def ingest(settings: IngestSettings, give_up: threading.Event, on_batch: Callable[[int], None]) -> Ingestion:
    """Run the ingestion step until the topic is drained, `give_up` is set (checked after each batch) or it
    fails; `on_batch` gets the documents applied so far after every batch."""
    outcome, started = Ingestion(), time.perf_counter()
    try:
        for report in batches_until_drained(settings):
            outcome.applied += report.applied
            outcome.batches += 1
            outcome.injection_ms += report.injection_ms
            outcome.probe_ms += report.probe_ms
            outcome.seconds = time.perf_counter() - started
            outcome.batch_done_s.append(round(outcome.seconds, 2))
            on_batch(outcome.applied)
            if give_up.is_set():
                break
        else:
            outcome.drained = True
    except Exception as error:  # reported in the table and the exit code, not raised through the level
        outcome.error = f"{type(error).__name__}: {error}"
    return outcome


async def client(http: httpx.AsyncClient, questions: Sequence[str], rng: random.Random, max_new_tokens: int,
                 stop: asyncio.Event, seen: Queries) -> None:
    """One closed-loop client: a query, its answer, the next query, until `stop`."""
    while not stop.is_set():
        body = QueryRequest(question=rng.choice(questions), max_new_tokens=max_new_tokens).model_dump()
        started = time.perf_counter()
        try:
            response = await http.post("/v1/query", json=body)
            if response.is_success:
                answer = QueryResponse.model_validate(response.json())
        except Exception as error:  # timeouts, refused or broken connections, a malformed answer
            seen.errors[type(error).__name__] += 1
            await asyncio.sleep(ERROR_PAUSE_S)
            continue
        if not response.is_success:
            seen.errors[f"HTTP {response.status_code}"] += 1
            await asyncio.sleep(ERROR_PAUSE_S)
            continue
        seen.finished_at.append(time.perf_counter())
        seen.latencies_s.append(seen.finished_at[-1] - started)
        seen.in_window += not stop.is_set()
        seen.versions.add(answer.memory_version)


async def watch_health(url: str, timeout: float, stop: asyncio.Event, seen: Queries) -> None:
    """GET /v1/health every HEALTH_EVERY_S on its own connection until `stop`: how long the cheapest read
    (what a load balancer's health check would do) waits while the clients query."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout, connect=10.0)) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                (await http.get("/v1/health")).raise_for_status()
                seen.health_s.append(time.perf_counter() - started)
            except Exception as error:
                seen.errors[f"health: {type(error).__name__}"] += 1
            try:
                await asyncio.wait_for(stop.wait(), timeout=HEALTH_EVERY_S)
            except TimeoutError:
                pass


async def server_queries(http: httpx.AsyncClient) -> tuple[int, float, Counter[str]]:
    """From the server's /metrics: queries answered, their summed time (s), error answers by path+status."""
    response = await http.get("/metrics")
    response.raise_for_status()
    count, total, errors = 0, 0.0, Counter[str]()
    for line in response.text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "ckl_queries_total":
            count = int(float(value))
        elif name == "ckl_query_latency_seconds_sum":
            total = float(value)
        elif name.startswith("ckl_errors_total{"):
            labels = dict(part.split("=", 1) for part in name[len("ckl_errors_total{"):-1].split(","))
            errors[f"{labels['path'].strip(chr(34))} {labels['status'].strip(chr(34))}"] = int(float(value))
    return count, total, errors


async def run_level(clients: int, docs: Sequence[Document], services: dict, state: Path,
                    args: argparse.Namespace) -> Level:
    """A fresh server, the documents on a fresh topic, the ingestion with `clients` clients querying."""
    token, topic = secrets.token_urlsafe(12), f"ckl.load.c{clients}"
    questions = [probe.question for doc in docs for probe in doc.probes]
    connections = max(clients, 1)
    with model_server(args.model, state / f"c{clients}", token) as server:
        published = publish(services["kafka_bootstrap"], topic, docs)
        settings = ingest_settings(services, server, token, args.batch_size, args.probe_questions,
                                   topic=topic, group=f"ckl-load-c{clients}")
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=server.url, limits=limits,
                                     timeout=httpx.Timeout(args.timeout, connect=10.0)) as http:
            # one query before measuring: the first one pays for loading what the server loads lazily
            warm_up = {"question": questions[0], "max_new_tokens": 1}
            (await http.post("/v1/query", json=warm_up)).raise_for_status()
            before = await server_queries(http)
            print(f"[c={clients}] server up, {published} documents published to {topic}; running",
                  file=sys.stderr, flush=True)

            loop, stop, give_up = asyncio.get_running_loop(), asyncio.Event(), threading.Event()

            def on_batch(applied: int) -> None:  # runs in the ingestion thread
                if applied >= published and args.duration is None:
                    loop.call_soon_threadsafe(stop.set)

            started = time.perf_counter()
            ingestion = asyncio.ensure_future(asyncio.to_thread(ingest, settings, give_up, on_batch))
            if args.duration is None:
                ingestion.add_done_callback(lambda _: stop.set())
            seen = Queries()
            tasks = [asyncio.create_task(client(http, questions, random.Random(f"{args.seed}:{i}"),
                                                args.max_new_tokens, stop, seen))
                     for i in range(clients)]
            tasks.append(asyncio.create_task(watch_health(server.url, args.timeout, stop, seen)))
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.duration or args.time_limit)
            except TimeoutError:
                pass
            stop.set()
            window_s = time.perf_counter() - started
            if tasks:  # the requests in flight finish (each bounded by --timeout)
                _, late = await asyncio.wait(tasks, timeout=args.timeout + DRAIN_MARGIN_S)
                for task in late:
                    task.cancel()
            left = max(args.time_limit - (time.perf_counter() - started), 0.0)
            done, _ = await asyncio.wait({ingestion}, timeout=left)
            if not done:
                print(f"[c={clients}] time limit: the ingestion stops after its current batch",
                      file=sys.stderr, flush=True)
                give_up.set()
            outcome = await ingestion
            after = await server_queries(http)
            memory = MemoryResponse.model_validate((await http.get("/v1/memory")).raise_for_status().json())
        lag = await asyncio.to_thread(consumer_lag, services["kafka_bootstrap"], topic, settings.group)

    served = after[0] - before[0]
    latencies = seen.latencies_s
    return Level(
        clients=clients,
        window_s=window_s,
        queries=len(latencies),
        queries_per_s=seen.in_window / window_s if clients else math.nan,
        latency_ms={name: 1000 * value for name, value in (
            ("p50", percentile(latencies, 50)), ("p99", percentile(latencies, 99)),
            ("max", max(latencies, default=math.nan)),
            ("mean", sum(latencies) / len(latencies) if latencies else math.nan))},
        server_ms_per_query=1000 * (after[1] - before[1]) / served if served else math.nan,
        timeline=timeline(seen, started),
        health_ms={"p50": 1000 * percentile(seen.health_s, 50),
                   "max": 1000 * max(seen.health_s, default=math.nan), "count": len(seen.health_s)},
        errors=dict(seen.errors),
        server_errors=dict(after[2] - before[2]),
        memory_versions=[min(seen.versions), max(seen.versions)] if seen.versions else [],
        final_memory_version=memory.memory_version,
        published=published,
        applied=memory.documents_applied,
        left_in_kafka=lag,
        lost=max(published - lag - memory.documents_applied, 0),
        ingestion=outcome,
    )


def tables(levels: Sequence[Level]) -> str:
    """The queries' table and the ingestion's (its docs/s against the level without queries)."""
    query_rows, ingest_rows = [], []
    baseline = next((level.ingestion.docs_per_s for level in levels if level.clients == 0), math.nan)
    for level in levels:
        latency, health, ingestion = level.latency_ms, level.health_ms, level.ingestion
        queries: list[object] = ["-"] * 8
        if level.clients:
            versions = "{}-{}".format(*level.memory_versions) if level.memory_versions else "-"
            queries = [level.queries, f"{level.queries_per_s:.1f}", f"{latency['p50']:.0f}",
                       f"{latency['p99']:.0f}", f"{latency['max']:.0f}", f"{level.server_ms_per_query:.0f}",
                       sum(n for kind, n in level.errors.items() if not kind.startswith("health")),
                       f"{versions} of {level.final_memory_version}"]
        query_rows.append([level.clients, f"{level.window_s:.1f}", *queries,
                           f"{health['p50']:.0f} / {health['max']:.0f}"])
        batches = ingestion.batches or math.nan
        compared = level.clients and not math.isnan(baseline)
        ingest_rows.append([
            level.clients, level.published, level.applied, level.left_in_kafka, level.lost,
            f"{ingestion.docs_per_s:.1f}", f"{ingestion.docs_per_s / baseline:.0%}" if compared else "-",
            f"{ingestion.seconds / batches:.1f}", f"{ingestion.injection_ms / 1000 / batches:.1f}",
            f"{ingestion.probe_ms / 1000 / batches:.1f}"])
    query_table = markdown_table(
        ["clients", "window (s)", "queries", "queries/s", "p50 (ms)", "p99 (ms)", "max (ms)",
         "server ms/query", "errors", "memory versions answered", "health p50 / max (ms)"], query_rows)
    ingest_table = markdown_table(
        ["clients", "published", "applied", "left in Kafka", "lost", "docs/s", "vs no queries",
         "s per batch", "server injecting (s/batch)", "server probing (s/batch)"], ingest_rows)
    return f"Queries\n\n{query_table}\n\nIngestion\n\n{ingest_table}"


def without_nan(value: object) -> object:
    """`value` with every nan float replaced by None (JSON has no nan)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


def client_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"want positive client counts separated by commas, got {text!r}")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=client_levels, default="50,200",
                        help="concurrent clients of each level, comma-separated (default: 50,200)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the level without queries (the ingestion's docs/s without load)")
    parser.add_argument("--docs", type=int, default=256,
                        help="documents published and ingested per level (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="messages per ingestion batch (default: %(default)s)")
    parser.add_argument("--probe-questions", type=int, default=10,
                        help="retention probes per batch, as `ckl ingest` (default: %(default)s; 0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=12,
                        help="max_new_tokens of every query (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="query for this long in each level (default: until the last document is "
                             "applied)")
    parser.add_argument("--time-limit", type=float, default=600.0, metavar="SECONDS",
                        help="most time per level from its first query; the ingestion stops after its "
                             "current batch then (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="client timeout of a request (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT,
                        help="checkpoint directory (default: model/default)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the documents and the questions (default: %(default)s)")
    parser.add_argument("--state", type=Path, default=None, metavar="DIR",
                        help="state dir of the services and servers, kept afterwards (default: a temporary "
                             "one, removed)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.docs < 1:
        parser.error("--docs must be at least 1")
    return args


async def run(args: argparse.Namespace, state: Path) -> list[Level]:
    docs = documents(args.docs, args.seed)
    levels = ([] if args.no_baseline else [0]) + args.clients
    with local_services(state) as services:
        return [await run_level(clients, docs, services, state, args) for clients in levels]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    with (nullcontext(str(args.state)) if args.state
          else tempfile.TemporaryDirectory(prefix="ckl-load-")) as state:
        Path(state).mkdir(parents=True, exist_ok=True)
        levels = asyncio.run(run(args, Path(state)))
    print(f"{args.docs} documents per level (batches of {args.batch_size}, {args.probe_questions} probes per "
          f"batch), queries with max_new_tokens {args.max_new_tokens}, model {args.model}; "
          f"{os.cpu_count()} cores, load average {load_before[0]:.2f} before the run\n")
    print(tables(levels))
    for level in levels:
        if level.errors or level.server_errors:
            print(f"\nc={level.clients}: client errors {level.errors or '{}'}; "
                  f"server error answers {level.server_errors or '{}'}")
        if level.ingestion.error or not level.ingestion.drained:
            print(f"\nc={level.clients}: ingestion {level.ingestion.error or 'not drained (time limit)'}")
    if args.json:
        settings = {name: str(value) if isinstance(value, Path) else value
                    for name, value in vars(args).items()}
        results = {"settings": settings, "cores": os.cpu_count(), "load_average_before": load_before,
                   "levels": [level.to_dict() for level in levels]}
        args.json.write_text(json.dumps(without_nan(results), indent=1) + "\n")
    failed = [level.clients for level in levels if level.lost or level.ingestion.error]
    if failed:
        print(f"\nFAILED: documents lost or ingestion failed at clients={failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
