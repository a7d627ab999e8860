"""The server's Prometheus metrics, rendered in the text exposition format (version 0.0.4).

Small enough to write by hand: counters, one latency histogram and gauges, updated under one lock.
"""

import bisect
import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUERY_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT_LATENCY_WEIGHT = 0.2  # weight of the newest query in the recent latency (an exponential average)


class ServerMetrics:
    """Counts queries, injections, documents and errors; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queries = 0
        self._latency_bucket_counts = [0] * len(QUERY_LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._recent_latency: float | None = None
        self._injections = 0
        self._documents_applied = 0
        self._documents_skipped = 0
        self._snapshots = 0
        self._errors: Counter[tuple[str, int]] = Counter()
        self._memory_version = 0

    def observe_query(self, seconds: float) -> None:
        """One answered query and its latency."""
        with self._lock:
            self._queries += 1
            self._latency_sum += seconds
            if self._recent_latency is None:
                self._recent_latency = seconds
            else:
                self._recent_latency += RECENT_LATENCY_WEIGHT * (seconds - self._recent_latency)
            index = bisect.bisect_left(QUERY_LATENCY_BUCKETS, seconds)
            if index < len(self._latency_bucket_counts):
                self._latency_bucket_counts[index] += 1

    def recent_query_seconds(self) -> float | None:
        """The latency of recent queries (an exponential average, newest weighing RECENT_LATENCY_WEIGHT);
        None before the first one."""
        with self._lock:
            return self._recent_latency

    def observe_batch(self, injections: int, applied: int, skipped: int, memory_version: int) -> None:
        """One injected batch."""
        with self._lock:
            self._injections += injections
            self._documents_applied += applied
            self._documents_skipped += skipped
            self._memory_version = memory_version

    def observe_snapshot(self) -> None:
        with self._lock:
            self._snapshots += 1

    def observe_error(self, path: str, status: int) -> None:
        """One request answered with an error status (4xx or 5xx)."""
        with self._lock:
            self._errors[(path, status)] += 1

    def set_memory_version(self, version: int) -> None:
        with self._lock:
            self._memory_version = version

    def render(self) -> str:
        """All metrics in the Prometheus text format."""
        with self._lock:
            lines = [
                *_single("ckl_queries_total", "counter", "Queries answered.", self._queries),
                "# HELP ckl_query_latency_seconds Time to answer a query.",
                "# TYPE ckl_query_latency_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip(QUERY_LATENCY_BUCKETS, self._latency_bucket_counts, strict=True):
                cumulative += count
                lines.append(f'ckl_query_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
            lines += [
                f'ckl_query_latency_seconds_bucket{{le="+Inf"}} {self._queries}',
                f"ckl_query_latency_seconds_sum {self._latency_sum}",
                f"ckl_query_latency_seconds_count {self._queries}",
                *_single(
                    "ckl_injections_total", "counter", "Contexts injected into memory.", self._injections
                ),
                *_single(
                    "ckl_documents_applied_total",
                    "counter",
                    "Documents applied to memory.",
                    self._documents_applied,
                ),
                *_single(
                    "ckl_documents_skipped_total",
                    "counter",
                    "Documents skipped as already applied (redeliveries).",
                    self._documents_skipped,
                ),
                *_single("ckl_snapshots_total", "counter", "Snapshot requests answered.", self._snapshots),
                *_single("ckl_memory_version", "gauge", "Current memory version.", self._memory_version),
                "# HELP ckl_errors_total Requests answered with an error status.",
                "# TYPE ckl_errors_total counter",
            ]
            for (path, status), count in sorted(self._errors.items()):
                lines.append(f'ckl_errors_total{{path="{_escape(path)}",status="{status}"}} {count}')
        return "\n".join(lines) + "\n"


def _single(name: str, kind: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
