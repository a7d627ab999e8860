"""Turns on the model: one forward pass at a time, shared fairly between queries and the memory writer.

Queries go in arrival order. When the writer (one batch, one context per turn) and queries both wait,
they alternate: a batch advances by at least one context per query, however many queries queue up, and
a query waits for at most one context of a batch. (Python's Lock gives no such order: a thread that
releases it can take it straight back.)

How many queries may wait for a turn at all is the server's cap (`ServerSettings.max_waiting_queries`,
its default in serving/settings.py; enforced in serving/app.py).
"""

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class ModelTurns:
    """A mutex for model forward passes with fair turn-taking between queries and a single writer."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._busy = False
        self._queries: deque[object] = deque()  # waiting queries' tickets, oldest first
        self._writer_waiting = False
        self._writer_went_last = False

    @contextmanager
    def query(self) -> Iterator[None]:
        """Hold the model for one query."""
        ticket = object()
        with self._condition:
            self._queries.append(ticket)
            self._condition.wait_for(
                lambda: not self._busy
                and self._queries[0] is ticket
                and (not self._writer_waiting or self._writer_went_last)
            )
            self._queries.popleft()
            self._take(writer=False)
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def update(self) -> Iterator[None]:
        """Hold the model for one step of the (single) writer."""
        with self._condition:
            self._writer_waiting = True
            self._condition.wait_for(
                lambda: not self._busy and (not self._queries or not self._writer_went_last)
            )
            self._writer_waiting = False
            self._take(writer=True)
        try:
            yield
        finally:
            self._release()

    def _take(self, writer: bool) -> None:
        self._busy = True
        self._writer_went_last = writer

    def _release(self) -> None:
        with self._condition:
            self._busy = False
            self._condition.notify_all()
