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

# Held-out text for the degradation loss: two biographies in the default model's domain (people generated
# with a seed no stream uses), never injected. A deployment of another model passes its own text.
HELDOUT_TEXT = (
    "Kreliol Rawioriov received an education at Zhejiang University. Kreliol Rawioriov has a job at "
    "Ericsson. Kreliol Rawioriov majored in Journalism. Kreliol Rawioriov was born on November 9, 1994, a "
    "day the family still remembers. The birthplace of Kreliol Rawioriov is Melbourne. "
    "The field of study of Magrys Aidako was Pharmacy. The employer of Magrys Aidako is Morgan Stanley. "
    "For university, Magrys Aidako chose Stellenbosch University. Magrys Aidako's life began on November "
    "21, 1977. Magrys Aidako is a native of London."
)


@dataclass(frozen=True)
class ProbeBudget:
    """At most `questions` probe questions per call, within `max_ms` milliseconds by the running estimates
    of what the degradation loss and a question cost (see `run_probes`)."""

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
    """Up to `budget.questions` probes, spread over the age buckets in turn, each from a random entry of its
    bucket that has probes, in random order (a time budget that cuts the list short still samples every
    bucket over many calls). `read_infos(seqs)` returns the bank's rows for seqs (their
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
    rng.shuffle(sampled)
    return sampled


@dataclass
class ProbeCosts:
    """Running estimates (ms) of the degradation loss and of one question (asked in both modes)."""

    loss_ms: float | None = None
    question_ms: float | None = None

    def learn(self, name: str, took_ms: float) -> None:
        """Fold a measured cost into its estimate (an exponential moving average)."""
        known = getattr(self, name)
        setattr(self, name, took_ms if known is None else 0.8 * known + 0.2 * took_ms)


def run_probes(probes: Sequence[SampledProbe], ask: Callable[[str, bool], str],
               loss: Callable[[], float] | None, budget: ProbeBudget, costs: ProbeCosts) -> ProbeReport:
    """Compute the degradation `loss()`, then ask each probe from the pool alone (`ask(question, False)`)
    and with the bank (`ask(question, True)`), each only while the time budget has room for it by the
    estimates in `costs`, which learn from what this call measures."""
    started = time.perf_counter()

    def room_for(cost_ms: float | None) -> bool:
        elapsed_ms = (time.perf_counter() - started) * 1000
        return budget.max_ms is None or elapsed_ms + (cost_ms or 0.0) <= budget.max_ms

    degradation = None
    if loss is not None and room_for(costs.loss_ms):
        step = time.perf_counter()
        degradation = loss()
        costs.learn("loss_ms", (time.perf_counter() - step) * 1000)
    buckets: dict[str, BucketScore] = {}
    asked = 0
    for probe in probes:
        if not room_for(costs.question_ms):
            break
        step = time.perf_counter()
        score = buckets.setdefault(probe.bucket, BucketScore())
        score.asked += 1
        asked += 1
        for mode in MODES:
            predicted = ask(probe.question, mode == "bank")
            score.exact[mode] += answers_match(predicted, probe.answer)
            score.f1[mode] += token_f1(predicted, probe.answer)
        costs.learn("question_ms", (time.perf_counter() - step) * 1000)
    return ProbeReport(buckets, degradation, asked, (time.perf_counter() - started) * 1000)
