"""The model server's HTTP API (FastAPI): queries read the live memory, writes change it.

Reads (`/v1/query`, `/v1/memory`, `/v1/snapshots`, `/v1/health`, `/metrics`) are open unless a read token
is configured; writes (`POST /v1/inject`, `/v1/snapshots`, `/v1/snapshots/prune`, `/v1/bank/compact`,
`/v1/probe`, `/v1/rollback`) need `Authorization: Bearer <write token>` and are refused with 503 when the
server has none. The OpenAPI page (`/docs`) documents every body and every refusal's status. Every
refusal is a JSON object with a `detail`: a sentence, or for 422 a list of {loc, msg, type} naming each
invalid field.

Lanes: queries wait for the model in a lane of their own, where at most `query_concurrency` of them hold a
worker thread and the rest wait without one, at most `max_waiting_queries` of them: a query arriving when
that many wait is refused with 503 and `Retry-After` (about as long as recent queries took to be
answered; counted, like every error, in `ckl_errors_total`).
Writes, probes and the cheap reads (health, memory, metrics) use the server's other threads and are never
capped, so however many queries queue up, a batch's inject or a health check starts at once (the model
then alternates fairly between the writer and queries, serving/turns.py). Token checks run on the event
loop.
"""

import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitoring.probes import ProbeBudget
from serving.metrics import CONTENT_TYPE, ServerMetrics
from serving.schemas import (
    CompactResponse,
    ErrorResponse,
    HealthResponse,
    InjectRequest,
    InjectResponse,
    Limits,
    MemoryInfo,
    MemoryResponse,
    ProbeRequest,
    ProbeResponse,
    PruneRequest,
    PruneResponse,
    QueryRequest,
    QueryResponse,
    RemovedEntryInfo,
    RetrievalInfo,
    RollbackRequest,
    RollbackResponse,
    SnapshotListResponse,
    SnapshotResponse,
)
from serving.settings import WRITE_TOKEN_ENV, ServerSettings
from serving.snapshots import SnapshotInfo, list_snapshots
from serving.state import LiveState, RollbackRefused

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]
MAX_RETRY_AFTER_S = 60  # the longest wait a query refused for the waiting queries is told


def retry_after_seconds(recent_query_seconds: float | None) -> int:
    """What a query refused for the waiting queries is told to wait: about as long as recent queries took
    from arrival to answer (by then the queries ahead of it are answered), in whole seconds, 1 to
    MAX_RETRY_AFTER_S; 1 before any query was answered."""
    if recent_query_seconds is None:
        return 1
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(recent_query_seconds)))


def _refusal(description: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """An error response for the OpenAPI document: {"detail": sentence}, and the headers it carries."""
    response: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        response["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                               for name, text in headers.items()}
    return response


# The refusals each route may answer with (422 for an invalid body FastAPI declares itself)
BEARER = {"WWW-Authenticate": "Bearer"}
READ_REFUSALS = {401: _refusal("No or a wrong bearer token, on a server with a read token.", BEARER)}
WRITE_REFUSALS = {
    401: _refusal("No or a wrong bearer token.", BEARER),
    503: _refusal("Writes are disabled: the server has no write token, or is a read replica."),
}
BODY_REFUSALS = {
    400: _refusal("The body is not usable JSON (not UTF-8, nested too deeply, an integer too long)."),
    413: _refusal("The body is over the server's max_body_bytes."),
}
QUERY_REFUSALS = READ_REFUSALS | BODY_REFUSALS | {
    413: _refusal("The question is over max_question_chars, or the body over max_body_bytes."),
    503: _refusal("max_waiting_queries queries are waiting for the model already: retry later.",
                  {"Retry-After": "Seconds to wait before asking again."}),
}
INJECT_REFUSALS = WRITE_REFUSALS | BODY_REFUSALS | {
    413: _refusal("Over max_batch_documents documents, a text over max_text_chars, or the body over "
                  "max_body_bytes."),
}
ROLLBACK_REFUSALS = WRITE_REFUSALS | BODY_REFUSALS | {
    409: _refusal("The rollback cannot be done (a version from the future, or one compaction made "
                  "unbuildable); nothing changed."),
}


def create_app(
    state: LiveState,
    settings: ServerSettings,
    metrics: ServerMetrics,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The API over a loaded live state; `on_shutdown` runs when the server shuts down gracefully."""

    query_lane: anyio.CapacityLimiter | None = None  # made in the event loop, at startup
    queries_in_lane = 0  # queries handed to the model or waiting for it; only touched on the event loop

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal query_lane
        query_lane = anyio.CapacityLimiter(settings.query_concurrency)
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(
        title="ckl model server",
        version="1",
        description="Ask the live MemoryLLM questions; inject documents into its memory; snapshot its state.",
        lifespan=lifespan,
    )

    async def require_write(credentials: Credentials) -> None:
        if settings.follow_s is not None:
            raise HTTPException(503, "this server is a read replica (--follow): send writes to the writer")
        if settings.write_token is None:
            raise HTTPException(503, f"writes are disabled: the server was started without {WRITE_TOKEN_ENV}")
        _check_token(credentials, (settings.write_token,))

    async def require_read(credentials: Credentials) -> None:
        if settings.read_token is not None:
            _check_token(credentials, tuple(t for t in (settings.read_token, settings.write_token) if t))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        """422 naming each invalid field, echoing the input in a form JSON can carry (FastAPI's own handler
        fails with a 500 on an unpaired surrogate or a NaN in the input)."""
        return JSONResponse({"detail": _json_safe(jsonable_encoder(error.errors()))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        """FastAPI's handler, with the reason added to its "There was an error parsing the body" 400 (a body
        that is not UTF-8, has an integer too long to convert, or is nested too deeply)."""
        cause = error.__cause__
        if error.status_code == 400 and isinstance(cause, ValueError | RecursionError):
            reason = "nested too deeply" if isinstance(cause, RecursionError) else str(cause)
            error = HTTPException(400, f"the body is not usable JSON: {reason}")
        return await http_exception_handler(request, error)

    @app.middleware("http")
    async def count_errors(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            response = await _refuse_large_bodies(request, call_next, settings.max_body_bytes)
        except Exception:
            metrics.observe_error(_route_path(request), 500)
            raise
        if response.status_code >= 400:
            metrics.observe_error(_route_path(request), response.status_code)
        return response

    @app.post("/v1/query", dependencies=[Depends(require_read)], responses=QUERY_REFUSALS)
    async def query(request: QueryRequest) -> QueryResponse:
        """Answer a question from the current memory; the answer names the memory version that gave it.
        503 with Retry-After when `max_waiting_queries` queries wait for the model already."""
        nonlocal queries_in_lane
        if len(request.question) > settings.max_question_chars:
            raise HTTPException(
                413,
                f"question is {len(request.question)} characters, "
                f"over the limit of {settings.max_question_chars}",
            )
        if request.max_new_tokens > settings.max_new_tokens:  # a 422 shaped like the documented ones
            limit = settings.max_new_tokens
            raise RequestValidationError([{
                "type": "less_than_equal", "loc": ("body", "max_new_tokens"), "input": request.max_new_tokens,
                "msg": f"max_new_tokens is {request.max_new_tokens}, over the limit of {limit}",
                "ctx": {"le": limit},
            }])
        if queries_in_lane >= settings.query_concurrency + settings.max_waiting_queries:
            retry_after = retry_after_seconds(metrics.recent_query_seconds())
            raise HTTPException(
                503,
                f"too many queries are waiting for the model (the limit is {settings.max_waiting_queries}): "
                f"retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        queries_in_lane += 1  # no await between the check and here: no other query slips in
        started = time.perf_counter()
        try:
            answer, memory_version, retrieved = await anyio.to_thread.run_sync(
                state.answer, request.question, request.max_new_tokens, request.retrieve, limiter=query_lane
            )
        finally:
            queries_in_lane -= 1
        metrics.observe_query(time.perf_counter() - started)
        return QueryResponse(answer=answer, memory_version=memory_version, retrieved=retrieved)

    @app.post("/v1/inject", dependencies=[Depends(require_write)], responses=INJECT_REFUSALS)
    def inject(request: InjectRequest) -> InjectResponse:
        """Apply a batch of documents to memory, in order; doc_ids already applied are skipped."""
        if len(request.documents) > settings.max_batch_documents:
            raise HTTPException(
                413,
                f"batch has {len(request.documents)} documents, "
                f"over the limit of {settings.max_batch_documents}",
            )
        for document in request.documents:
            if len(document.text) > settings.max_text_chars:
                raise HTTPException(
                    413,
                    f"document {document.doc_id!r} has {len(document.text)} characters, "
                    f"over the limit of {settings.max_text_chars}",
                )
        result = state.apply(request.documents)
        metrics.observe_batch(
            result.injections, len(result.applied), len(result.skipped), result.memory_version
        )
        return InjectResponse(
            applied=result.applied,
            skipped_duplicates=result.skipped,
            injections=result.injections,
            memory_version=result.memory_version,
            injection_ms=result.injection_ms,
            checkpoint=result.checkpoint.id if result.checkpoint else None,
            excluded=result.excluded,
            lineage=state.lineage.id,
            bank_version=state.bank.lance_version,
            pool_sha256=state.runner.pool_sha256(),
        )

    @app.post("/v1/probe", dependencies=[Depends(require_write)], responses=WRITE_REFUSALS | BODY_REFUSALS)
    def probe(request: ProbeRequest) -> ProbeResponse:
        """Retention probes: stored questions of bank entries sampled by age, asked from the pool alone and
        with the bank, and the loss on a held-out text. Reads the memory; batches wait meanwhile."""
        report = state.probe(ProbeBudget(request.questions, request.max_ms), request.seed)
        return ProbeResponse(**report.to_dict(), memory_version=state.view().memory_version)

    @app.post("/v1/rollback", dependencies=[Depends(require_write)], responses=ROLLBACK_REFUSALS)
    def rollback(request: RollbackRequest) -> RollbackResponse:
        """Take the memory back to a version, byte for byte: the bank is truncated, the pool rebuilt from a
        checkpoint and the bank, and a new lineage starts; 409 when it cannot be done (nothing changes)."""
        try:
            result = state.rollback(request.version, request.exclude, request.dry_run)
        except RollbackRefused as error:
            raise HTTPException(409, str(error)) from error
        metrics.set_memory_version(state.view().memory_version)
        return RollbackResponse(
            from_version=result.from_version,
            to_version=result.to_version,
            removed=[RemovedEntryInfo(**vars(entry)) for entry in result.removed],
            restored_from=result.restored_from,
            lineage=result.lineage.id,
            previous_lineage=result.previous_lineage,
            replay_from=result.replay_from,
            checkpoint=result.checkpoint.id if result.checkpoint else None,
            memory_version=state.view().memory_version,
            pool_sha256=state.runner.pool_sha256(),
        )

    @app.post("/v1/snapshots", dependencies=[Depends(require_write)], responses=WRITE_REFUSALS)
    def write_snapshot() -> SnapshotResponse:
        """Make the current state (memory, ledger, offsets) durable: a new snapshot, or the newest one if
        nothing changed since it was written or restored."""
        info = state.snapshot()
        metrics.observe_snapshot()
        return _snapshot_response(info)

    @app.post("/v1/snapshots/prune", dependencies=[Depends(require_write)],
              responses=WRITE_REFUSALS | BODY_REFUSALS)
    def prune_snapshots(request: PruneRequest) -> PruneResponse:
        """Delete all but the newest `keep_last` valid snapshots (corrupt newer ones stay for inspection)."""
        removed = state.prune_snapshots(request.keep_last)
        kept = list_snapshots(settings.snapshot_root)
        return PruneResponse(removed=[path.name for path in removed], kept=[info.id for info in kept])

    @app.post("/v1/bank/compact", dependencies=[Depends(require_write)], responses=WRITE_REFUSALS)
    def compact_bank() -> CompactResponse:
        """Compact the memory bank: drop exact tokens every kept checkpoint covers (retrieval slots stay),
        merge small files, delete old versions. Never runs during a batch."""
        return CompactResponse(**state.compact_bank())

    @app.get("/v1/snapshots", dependencies=[Depends(require_read)], responses=READ_REFUSALS)
    def snapshots() -> SnapshotListResponse:
        """The snapshots on disk, newest first."""
        infos = list_snapshots(settings.snapshot_root)
        return SnapshotListResponse(snapshots=[_snapshot_response(info) for info in infos])

    @app.get("/v1/memory", dependencies=[Depends(require_read)], responses=READ_REFUSALS)
    def memory() -> MemoryResponse:
        """The current memory version, injection count, ledger size and last Kafka offsets."""
        view = state.view()
        return MemoryResponse(
            memory_version=view.memory_version,
            injections=view.injections,
            documents_applied=view.documents_applied,
            last_offsets=view.last_offsets,
            bank_entries=len(state.bank),
            pool_sha256=state.runner.pool_sha256(),
            lineage=state.lineage.id,
            lineage_parent=state.lineage.parent,
            lineage_from_version=state.lineage.from_version,
            excluded=len(state.lineage.excluded),
        )

    @app.get("/v1/health", dependencies=[Depends(require_read)], responses=READ_REFUSALS)
    def health() -> HealthResponse:
        """The server is up; what it serves and its limits."""
        return HealthResponse(
            status="ok",
            memory_version=state.view().memory_version,
            checkpoint=str(settings.checkpoint),
            device=state.runner.device,
            dtype=state.runner.dtype,
            context_tokens=state.context_tokens,
            writes_enabled=settings.write_token is not None and settings.follow_s is None,
            follow_s=settings.follow_s,
            limits=Limits(
                max_question_chars=settings.max_question_chars,
                max_new_tokens=settings.max_new_tokens,
                max_batch_documents=settings.max_batch_documents,
                max_body_bytes=settings.max_body_bytes,
                max_text_chars=settings.max_text_chars,
            ),
            retrieval=RetrievalInfo(
                enabled=state.retriever is not None and settings.retrieval.enabled,
                top_k=settings.retrieval.top_k,
                token_budget=settings.retrieval.token_budget,
                keys=settings.retrieval.keys,
            ),
            memory=MemoryInfo(**state.runner.memory_info()),
        )

    @app.get("/metrics", dependencies=[Depends(require_read)], response_class=Response,
             responses=READ_REFUSALS)
    def prometheus_metrics() -> Response:
        """Prometheus metrics: queries, query latency, injections, documents, errors."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _check_token(credentials: HTTPAuthorizationCredentials | None, accepted: tuple[str, ...]) -> None:
    if credentials is None:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(credentials.credentials.encode(), t.encode()) for t in accepted):
        raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


async def _refuse_large_bodies(request: Request, call_next: Callable[[Request], Awaitable[Response]],
                               limit: int) -> Response:
    """413 for a body whose Content-Length is over `limit` bytes, before it is read. (A chunked body, with
    no Content-Length, is read whole; the fields' own limits still apply to it.)"""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return JSONResponse({"detail": f"the body is {declared} bytes, over the limit of {limit}"}, 413)
    return await call_next(request)


def _json_safe(value: Any) -> Any:
    """A decoded JSON value with what JSON cannot carry made text: unpaired surrogates escaped, NaN and
    infinities as "nan" / "inf"."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    return value


def _route_path(request: Request) -> str:
    """The matched route's path, or one label for every unknown path (bounded metric labels)."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def _snapshot_response(info: SnapshotInfo) -> SnapshotResponse:
    return SnapshotResponse(
        id=info.id, path=str(info.path), memory_version=info.memory_version, created_at=info.created_at
    )
