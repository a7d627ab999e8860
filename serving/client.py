"""A small HTTP client for `ckl serve`, used by the ingestion code and the tests.

Connection failures are retried with backoff (every write is idempotent: inject by doc_id); an error
answer raises `ServerError` with the status and the server's message.
"""

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel

from serving.schemas import (
    CompactResponse,
    HealthResponse,
    InjectDocument,
    InjectRequest,
    InjectResponse,
    MemoryResponse,
    ProbeRequest,
    ProbeResponse,
    PruneRequest,
    PruneResponse,
    QueryRequest,
    QueryResponse,
    RollbackRequest,
    RollbackResponse,
    SnapshotListResponse,
    SnapshotResponse,
)

SERVER_FILE = "server.json"
Response = TypeVar("Response", bound=BaseModel)
# the request did not reach the server, or the connection broke before an answer: safe to send again
RETRIED_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


class ServerError(Exception):
    """The server answered with an error status."""

    def __init__(self, method: str, path: str, status: int, detail: Any):
        super().__init__(f"{method} {path} -> {status}: {detail}")
        self.status = status
        self.detail = detail


class ServerUnreachable(Exception):
    """No answer from the server after every retry."""


def read_server_file(state_dir: Path) -> dict[str, Any]:
    """The running server's {"pid", "url"} written by `ckl serve` into `<state_dir>/server.json`."""
    path = state_dir / SERVER_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ServerUnreachable(f"no {path}: start the model server with `ckl serve`") from None


class ModelServerClient:
    """Calls the server's HTTP API; `token` is sent as a bearer token on every request."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 600.0,
        retries: int = 5,
        backoff_seconds: float = 0.5,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))
        self._retries = retries
        self._backoff_seconds = backoff_seconds

    def query(self, question: str, max_new_tokens: int = 32, retrieve: bool | None = None) -> QueryResponse:
        """Ask a question; `retrieve` overrides the server's retrieval setting for this query."""
        body = QueryRequest(question=question, max_new_tokens=max_new_tokens, retrieve=retrieve)
        return self._call("POST", "/v1/query", QueryResponse, body)

    def inject(self, documents: Iterable[InjectDocument | Mapping[str, Any]]) -> InjectResponse:
        """Apply documents (with their Kafka topic/partition/offset) to memory, skipping applied doc_ids."""
        body = InjectRequest(documents=[InjectDocument.model_validate(d) for d in documents])
        return self._call("POST", "/v1/inject", InjectResponse, body)

    def snapshot(self) -> SnapshotResponse:
        """Write a snapshot of the current state now."""
        return self._call("POST", "/v1/snapshots", SnapshotResponse)

    def prune_snapshots(self, keep_last: int) -> PruneResponse:
        """Delete all but the newest `keep_last` valid snapshots on the server's disk."""
        return self._call("POST", "/v1/snapshots/prune", PruneResponse, PruneRequest(keep_last=keep_last))

    def compact_bank(self) -> CompactResponse:
        """Compact the server's memory bank (see POST /v1/bank/compact)."""
        return self._call("POST", "/v1/bank/compact", CompactResponse)

    def probe(self, questions: int = 10, max_ms: float | None = None,
              seed: int | None = None) -> ProbeResponse:
        """Run retention probes on the server's current memory (see POST /v1/probe)."""
        request = ProbeRequest(questions=questions, max_ms=max_ms, seed=seed)
        return self._call("POST", "/v1/probe", ProbeResponse, request)

    def rollback(self, version: int, exclude: Iterable[str] = (), dry_run: bool = False) -> RollbackResponse:
        """Take the server's memory back to `version` (see POST /v1/rollback); a retry after a broken
        connection is harmless: rolling back to the current version with no new exclusion changes nothing."""
        request = RollbackRequest(version=version, exclude=list(exclude), dry_run=dry_run)
        return self._call("POST", "/v1/rollback", RollbackResponse, request)

    def snapshots(self) -> list[SnapshotResponse]:
        return self._call("GET", "/v1/snapshots", SnapshotListResponse).snapshots

    def memory(self) -> MemoryResponse:
        return self._call("GET", "/v1/memory", MemoryResponse)

    def health(self) -> HealthResponse:
        return self._call("GET", "/v1/health", HealthResponse)

    def metrics(self) -> str:
        return self._send("GET", "/metrics", None).text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(
        self, method: str, path: str, response_type: type[Response], body: BaseModel | None = None
    ) -> Response:
        payload = body.model_dump(mode="json") if body is not None else None
        return response_type.model_validate(self._send(method, path, payload).json())

    def _send(self, method: str, path: str, payload: dict[str, Any] | None) -> httpx.Response:
        for attempt in range(self._retries + 1):
            try:
                response = self._http.request(method, path, json=payload)
                break
            except RETRIED_ERRORS as error:
                if attempt == self._retries:
                    raise ServerUnreachable(
                        f"{method} {self._http.base_url}{path}: {error} (after {self._retries + 1} attempts)"
                    ) from error
                time.sleep(self._backoff_seconds * 2**attempt)
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServerError(method, path, response.status_code, detail)
        return response
