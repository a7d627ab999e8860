"""Retention probes of a live memory: questions of earlier documents, sampled by age, answered now.

After a batch, the server (serving.state.LiveState.probe) asks the probes stored with bank entries of
every age bucket — age is how many injections came after the entry's own — once from the pool alone and
once with retrieval from the bank, and scores exact match and token F1. A loss on a fixed held-out text
tracks degradation of the model's language with the current pool in front. A budget (questions, and
milliseconds) bounds the work; probing reads the memory and never changes it.
"""

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from model.prompts import answers_match


@dataclass(frozen=True)
class AgeBucket:
    """Entries with `low` <= age <= `high` (None: no upper end)."""

    name: str
    low: int
    high: int | None


BUCKETS = (
    AgeBucket("0", 0, 0),
    AgeBucket("1-10", 1, 10),
    AgeBucket("11-100", 11, 100),
    AgeBucket("101-1000", 101, 1000),
    AgeBucket("over-1000", 1001, None),
)
MODES = ("pool", "bank")

# Held-out text for the degradation loss: plain sentences in the stream's domain, never injected.
HELDOUT_TEXT = (
    "Marta Lindqvist was born in Uppsala. She studied at the University of Vienna and works as a "
    "translator. Her favourite colour is green, and she lives in Lisbon. "
    "Tomas Okafor was born in Lagos. He studied at the University of Toronto and works as an engineer. "
    "He lives in Oslo, and his favourite colour is blue."
)


@dataclass(frozen=True)
class ProbeBudget:
    """At most `questions` probe questions per call, and no new question after `max_ms` milliseconds (the
    first is always asked)."""

    questions: int = 10
    max_ms: float | None = None

    def __post_init__(self):
        if self.questions < 0:
            raise ValueError(f"questions must be >= 0, got {self.questions}")


@dataclass(frozen=True)
class SampledProbe:
    seq: int
    doc_id: str
    age: int
    bucket: str
    question: str
    answer: str


@dataclass
class BucketScore:
    asked: int = 0
    exact: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODES, 0))
    f1: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, 0.0))


@dataclass
class ProbeReport:
    """Scores per age bucket (only buckets that were asked), the degradation loss, and the cost."""

    buckets: dict[str, BucketScore]
    degradation_loss: float | None
    questions: int
    elapsed_ms: float

    def to_dict(self) -> dict:
        """A JSON-friendly form (the HTTP response)."""
        return {
            "buckets": {name: {"asked": score.asked, "exact": score.exact, "f1": score.f1}
                        for name, score in self.buckets.items()},
            "degradation_loss": self.degradation_loss,
            "questions": self.questions,
            "elapsed_ms": self.elapsed_ms,
        }


def retention_metric(mode: str, bucket: str, score: str = "em") -> str:
    """The MLflow metric name of one retention score: retention/<pool|bank>/<em|f1>/age_<bucket>."""
    return f"retention/{mode}/{score}/age_{bucket}"


def probe_metrics(report: Mapping) -> dict[str, float]:
    """MLflow metrics of a probe report in its dict form (`ProbeReport.to_dict`, the HTTP response):
    degradation_loss and retention/<pool|bank>/<em|f1>/age_<bucket> as fractions of the questions asked."""
    metrics: dict[str, float] = {}
    if report.get("degradation_loss") is not None:
        metrics["degradation_loss"] = report["degradation_loss"]
    for bucket, scores in report["buckets"].items():
        if scores["asked"]:
            for mode in MODES:
                metrics[retention_metric(mode, bucket)] = scores["exact"][mode] / scores["asked"]
                metrics[retention_metric(mode, bucket, "f1")] = scores["f1"][mode] / scores["asked"]
    return metrics


def token_f1(predicted: str, truth: str) -> float:
    """SQuAD-style token F1 of two answers (lower case, punctuation removed)."""
    def tokens(text: str) -> list[str]:
        return re.sub(r"[^\w\s]", " ", text.lower()).split()

    guess, gold = tokens(predicted), tokens(truth)
    common = sum((Counter(guess) & Counter(gold)).values())
    if not guess or not gold or not common:
        return float(guess == gold)
    precision, recall = common / len(guess), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def bucket_seqs(bucket: AgeBucket, next_seq: int) -> range:
    """The seqs of a bank whose next seq is `next_seq` that fall in `bucket` (age = next_seq - 1 - seq)."""
    newest = next_seq - 1 - bucket.low
    oldest = 0 if bucket.high is None else max(0, next_seq - 1 - bucket.high)
    return range(oldest, newest + 1) if newest >= 0 else range(0)


def sample_probes(next_seq: int, budget: ProbeBudget, read_infos: Callable[[Sequence[int]], list[dict]],
                  rng: random.Random) -> list[SampledProbe]:
    """Up to `budget.questions` probes, spread over the age buckets in turn (youngest first), each from a
    random entry of its bucket that has probes. `read_infos(seqs)` returns the bank's rows for seqs (their
    "probes" a list of {"question", "answer"})."""
    per_bucket = dict.fromkeys((b.name for b in BUCKETS), 0)
    ranges = {b.name: bucket_seqs(b, next_seq) for b in BUCKETS}
    allotted = 0
    while allotted < budget.questions:
        open_buckets = [name for name, seqs in ranges.items() if per_bucket[name] < len(seqs)]
        if not open_buckets:
            break
        for name in open_buckets[: budget.questions - allotted]:
            per_bucket[name] += 1
            allotted += 1
    sampled: list[SampledProbe] = []
    for bucket in BUCKETS:
        seqs, count = ranges[bucket.name], per_bucket[bucket.name]
        if not count:
            continue
        candidates = sorted(rng.sample(seqs, min(len(seqs), 4 * count)))
        rows = [row for row in read_infos(candidates) if row.get("probes")]
        for row in rng.sample(rows, min(count, len(rows))):
            question = rng.choice(row["probes"])
            sampled.append(SampledProbe(row["seq"], row["doc_id"], next_seq - 1 - row["seq"], bucket.name,
                                        question["question"], question["answer"]))
    return sampled


def run_probes(probes: Sequence[SampledProbe], ask: Callable[[str, bool], str],
               loss: Callable[[], float] | None, budget: ProbeBudget) -> ProbeReport:
    """Ask each probe from the pool alone (`ask(question, False)`) and with the bank (`ask(question, True)`)
    until the time budget runs out, then compute the degradation `loss()`."""
    started = time.perf_counter()
    buckets: dict[str, BucketScore] = {}
    asked = 0
    for probe in probes:
        if asked and budget.max_ms is not None and (time.perf_counter() - started) * 1000 >= budget.max_ms:
            break  # the first question is always asked: every probe run measures something
        score = buckets.setdefault(probe.bucket, BucketScore())
        score.asked += 1
        asked += 1
        for mode in MODES:
            predicted = ask(probe.question, mode == "bank")
            score.exact[mode] += answers_match(predicted, probe.answer)
            score.f1[mode] += token_f1(predicted, probe.answer)
    degradation = loss() if loss is not None else None
    return ProbeReport(buckets, degradation, asked, (time.perf_counter() - started) * 1000)
