"""Bad input against a real `ckl serve` (tiny random model), driven by the server's own OpenAPI document.

Schemathesis generates valid and invalid requests for every operation; whatever it sends, the server must
never answer 5xx, every 4xx must carry a JSON body with a non-empty `detail`, schema-invalid bodies must
be refused, and every status must be one the document declares for the operation, with a body of its
declared schema. Write endpoints are also checked explicitly without (or with a wrong) bearer token, and
the configured limits with oversized bodies. See docs/bad_input.md.

The schema is loaded from the running server and each operation's cases are drawn with
`operation.as_strategy()` under `hypothesis.given`: schemathesis' own lazy pytest loader
(`schemathesis.pytest.from_fixture`) does not run under pytest 9 (it sets `Node._nodeid`, gone there).
"""

import http.client
import json
import math
from collections.abc import Callable, Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from tiny_checkpoint import make_tiny_checkpoint

from serving.process import ServerProcess

WRITE_TOKEN = "bad-input-write-token"
AUTHORIZED = {"Authorization": f"Bearer {WRITE_TOKEN}"}
CONTEXT_TOKENS = 32
MAX_EXAMPLES = 60  # per operation and test; the file runs in ~45 s on a busy 2-core machine
OPERATIONS = [
    ("POST", "/v1/query"), ("POST", "/v1/inject"), ("POST", "/v1/probe"), ("POST", "/v1/rollback"),
    ("POST", "/v1/snapshots"), ("POST", "/v1/snapshots/prune"), ("POST", "/v1/bank/compact"),
    ("GET", "/v1/snapshots"), ("GET", "/v1/memory"), ("GET", "/v1/health"), ("GET", "/metrics"),
]
WRITES = {  # every write endpoint, with a valid body
    "/v1/inject": {"documents": [{"doc_id": "w-1", "text": "A valid document text.", "topic": "ckl.docs",
                                  "partition": 0, "offset": 1}]},
    "/v1/probe": {"questions": 1},
    "/v1/rollback": {"version": 0, "dry_run": True},
    "/v1/snapshots": None,
    "/v1/snapshots/prune": {"keep_last": 1},
    "/v1/bank/compact": None,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A throwaway server with a write token and open reads (the default deployment)."""
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))
    process = ServerProcess(
        checkpoint, tmp_path_factory.mktemp("bad-input-state"), WRITE_TOKEN,
        extra_args=["--context-tokens", str(CONTEXT_TOKENS)],
        env={"OMP_NUM_THREADS": "1"},  # one thread: far faster next to other CPU-bound work
    ).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> schemathesis.BaseSchema:
    """The server's OpenAPI document, as served."""
    config = schemathesis.Config()
    # The document puts every operation under the bearer scheme, but reads are open without a read token:
    # no generated Authorization headers; the tests below send (or withhold) the token themselves.
    config.projects.default.generation.update(with_security_parameters=False)
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


def assert_clear_refusal(response: httpx.Response | schemathesis.Response, request: str = "") -> None:
    """No 5xx, and a 4xx says why: a JSON object with a non-empty `detail`."""
    said = f"{response.status_code} {response.text[:500]}\nto {request[:2000]}"
    assert response.status_code < 500, said
    if response.status_code >= 400:
        detail = response.json().get("detail")
        assert detail, f"no reason: {said}"
        if isinstance(detail, list):  # validation errors: each names where and what
            assert all(error.get("loc") and error.get("msg") for error in detail), said


def assert_declared(api: schemathesis.BaseSchema, method: str, path: str, response: httpx.Response) -> None:
    """The response's status is one the OpenAPI document declares for the operation, its body that schema."""
    declared = api.raw_schema["paths"][path][method.lower()]["responses"]
    assert str(response.status_code) in declared, (method, path, response.status_code, sorted(declared))
    api[path][method].validate_response(response)  # the body, against the status' declared schema


def body_is_not_json(response: httpx.Response | schemathesis.Response) -> bool:
    """The refusal of a body that does not decode as JSON."""
    if response.status_code == 400:
        return "not usable JSON" in response.json()["detail"]
    return response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"


def fuzz(api: schemathesis.BaseSchema, method: str, path: str, check: Callable) -> None:
    """Run `check(case)` on valid and invalid cases of one operation."""
    operation = api[path][method]
    cases = st.one_of(operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                      operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(cases)
    def run(case: schemathesis.Case) -> None:
        check(case)

    run()


def test_the_openapi_document_lists_exactly_the_fuzzed_operations(api):
    operations = [result.ok() for result in api.get_all_operations()]
    assert {(operation.method.upper(), operation.path) for operation in operations} == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_with_the_write_token_no_input_gets_a_5xx_and_every_4xx_says_why(api, server, method, path):
    # Generated valid writes really run: documents are injected, snapshots written and pruned, the bank
    # compacted, the memory rolled back (to version 0 too: an empty memory again). That is fine on this
    # throwaway server and nothing here depends on its state.

    def check(case: schemathesis.Case) -> None:
        response = case.call(headers=AUTHORIZED)
        assert_clear_refusal(response, case.as_curl_command(headers=AUTHORIZED))
        case.validate_response(response, checks=[negative_data_rejection, response_schema_conformance,
                                                 status_code_conformance])

    fuzz(api, method, path, check)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_without_a_token_writes_are_refused_and_reads_never_fail(api, method, path):
    def check(case: schemathesis.Case) -> None:
        response = case.call()
        assert_clear_refusal(response, case.as_curl_command())
        if method == "POST" and path in WRITES:
            # FastAPI decodes a JSON body before it checks the token: a body that is not JSON at all gets
            # its 400/422 first; any JSON body, valid or not, gets the 401.
            if not body_is_not_json(response):
                assert response.status_code == 401, response.text[:500]
                assert response.headers["www-authenticate"] == ["Bearer"]
        case.validate_response(response, checks=[response_schema_conformance, status_code_conformance])

    fuzz(api, method, path, check)


# Valid documents as the Kafka path delivers them: schemathesis' valid inject bodies are mostly refused for an
# arbitrary published_at (the schema says only "string"), so the injection path gets its own property.
texts = st.text(min_size=1, max_size=300).filter(str.strip)
inject_documents = st.fixed_dictionaries(
    {"doc_id": st.text(min_size=1, max_size=20).filter(str.strip), "text": texts,
     "topic": st.sampled_from(["ckl.docs", "t"]), "partition": st.integers(0, 2**31 - 1),
     "offset": st.integers(0, 2**63 - 1)},
    optional={"source": st.none() | st.text(max_size=20),
              "published_at": st.none() | st.datetimes().map(lambda t: t.isoformat()),
              "probes": st.none() | st.lists(st.fixed_dictionaries({"question": texts, "answer": texts}),
                                             max_size=2)},
)


def test_valid_document_batches_are_applied_or_skipped_never_a_5xx(server):
    batches = iter(range(10**6))

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(inject_documents, min_size=1, max_size=4))
    def run(documents: list[dict]) -> None:
        batch = next(batches)  # fresh doc_ids, so most documents are applied rather than skipped
        documents = [{**doc, "doc_id": f"{batch}-{doc['doc_id']}"} for doc in documents]
        response = httpx.post(f"{server.url}/v1/inject", json={"documents": documents}, headers=AUTHORIZED,
                              timeout=120)
        assert response.status_code == 200, f"{response.status_code} {response.text[:500]} for {documents}"
        result = response.json()
        assert sorted(result["applied"] + result["skipped_duplicates"] + result["excluded"]) == \
            sorted(doc["doc_id"] for doc in documents)

    run()


# -------------------------------------------------------------------------------------- explicit classes


BAD_TOKENS = {
    "no header": {},
    "wrong token": {"Authorization": "Bearer not-the-token"},
    "token with a suffix": {"Authorization": f"Bearer {WRITE_TOKEN}x"},
    "scheme only": {"Authorization": "Bearer"},
    "no scheme": {"Authorization": WRITE_TOKEN},
    "basic scheme": {"Authorization": f"Basic {WRITE_TOKEN}"},
}


def state_of(url: str) -> tuple[dict, dict]:
    return httpx.get(f"{url}/v1/memory").json(), httpx.get(f"{url}/v1/snapshots").json()


@pytest.mark.parametrize("path", WRITES)
def test_every_write_refuses_a_missing_or_wrong_token_and_changes_nothing(api, server, path):
    before = state_of(server.url)
    for name, headers in BAD_TOKENS.items():
        response = httpx.post(f"{server.url}{path}", json=WRITES[path], headers=headers, timeout=60)
        assert response.status_code == 401, (name, response.text)
        assert_declared(api, "POST", path, response)
        assert response.headers["www-authenticate"] == "Bearer", name
        assert response.json()["detail"] in ("missing bearer token", "invalid bearer token"), name
    assert state_of(server.url) == before


def test_the_limits_are_enforced_with_413_or_422_naming_the_limit(api, server):
    limits = httpx.get(f"{server.url}/v1/health").json()["limits"]
    doc = {"doc_id": "limit", "text": "t", "topic": "ckl.docs", "partition": 0, "offset": 1}
    cases = [
        ("/v1/query", {"question": "x" * (limits["max_question_chars"] + 1)}, 413,
         f"over the limit of {limits['max_question_chars']}"),
        ("/v1/query", {"question": "Who?", "max_new_tokens": limits["max_new_tokens"] + 1}, 422,
         f"over the limit of {limits['max_new_tokens']}"),
        ("/v1/inject", {"documents": [{**doc, "text": "y" * (limits["max_text_chars"] + 1)}]}, 413,
         f"over the limit of {limits['max_text_chars']}"),
        ("/v1/inject", {"documents": [{**doc, "text": "z" * 5_000_000}]}, 413,  # a 5 MB body
         f"over the limit of {limits['max_text_chars']}"),
        ("/v1/inject", {"documents": [doc] * (limits["max_batch_documents"] + 1)}, 413,
         f"over the limit of {limits['max_batch_documents']}"),
        ("/v1/probe", {"questions": 1001}, 422, "less than or equal to 1000"),
        ("/v1/inject", {"documents": [{**doc, "partition": 2**31}]}, 422, "less than or equal to 2147483647"),
        ("/v1/inject", {"documents": [{**doc, "offset": 2**63}]}, 422, f"less than or equal to {2**63 - 1}"),
        ("/v1/inject", {"documents": [{**doc, "doc_id": "d" * 513}]}, 422, "at most 512 characters"),
        ("/v1/inject", {"documents": [{**doc, "source": "s" * 257}]}, 422, "at most 256 characters"),
        ("/v1/inject", {"documents": [{**doc, "probes": [{"question": "q?", "answer": "a"}] * 101}]}, 422,
         "at most 100 items"),
        ("/v1/inject", {"documents": [{**doc, "probes": [{"question": "q" * 2001, "answer": "a"}]}]}, 422,
         "at most 2000 characters"),
        ("/v1/rollback", {"version": 0, "dry_run": True, "exclude": ["x"] * 10_001}, 422,
         "at most 10000 items"),
    ]
    before = state_of(server.url)
    for path, body, status, message in cases:
        response = httpx.post(f"{server.url}{path}", json=body, headers=AUTHORIZED, timeout=60)
        assert response.status_code == status, (path, response.text[:300])
        assert message in response.text, (path, response.text[:300])
        assert_clear_refusal(response, path)
        assert_declared(api, "POST", path, response)
    assert state_of(server.url) == before


def json_body(value: object) -> bytes:
    """JSON as Python writes it: unpaired surrogates as \\uXXXX escapes, NaN and Infinity as such."""
    return json.dumps(value).encode()


def inject_body(**changes: object) -> bytes:
    doc = {"doc_id": "d", "text": "t", "topic": "ckl.docs", "partition": 0, "offset": 1}
    return json_body({"documents": [doc | changes]})


MALFORMED = [  # (method, path, body, status, part of the detail)
    ("POST", "/v1/query", b'{"question": "caf\xe9?"}', 400, "not usable JSON: 'utf-8' codec can't decode"),
    ("POST", "/v1/query", b"[" * 100_000, 400, "not usable JSON: nested too deeply"),
    ("POST", "/v1/query", b'{"question": "q", "max_new_tokens": 1' + b"0" * 5000 + b"}", 400,
     "not usable JSON: Exceeds the limit (4300 digits)"),
    ("POST", "/v1/query", b"plain text", 422, "JSON decode error"),
    ("POST", "/v1/query", b'{"question": ', 422, "JSON decode error"),
    ("POST", "/v1/query", b"", 422, "Field required"),
    ("POST", "/v1/query", b'["question"]', 422, "valid dictionary"),
    ("POST", "/v1/query", json_body({"question": "\ud800"}), 422, '"input":"\\\\ud800"'),
    ("POST", "/v1/query", json_body({"question": "q", "max_new_tokens": math.inf}), 422, '"input":"inf"'),
    ("POST", "/v1/query", json_body({"question": "q", "max_new_token": 3}), 422, "Extra inputs"),
    ("POST", "/v1/query", json_body({"question": "q", "max_new_tokens": True}), 422, "valid integer"),
    ("POST", "/v1/probe", json_body({"max_ms": math.nan}), 422, '"input":"nan"'),
    ("POST", "/v1/probe", json_body({"max_ms": math.inf}), 422, "finite number"),
    ("POST", "/v1/inject", inject_body(published_at="last Tuesday"), 422, "ISO-8601"),
    ("POST", "/v1/inject", inject_body(probes=[{"question": " ", "answer": "a"}]), 422, "non-whitespace"),
    ("POST", "/v1/inject", inject_body(txt="typo"), 422, "Extra inputs are not permitted"),
    ("POST", "/v1/inject", inject_body(doc_id="\udfff"), 422, "unicode string"),
    ("POST", "/v1/inject", inject_body(offset="1"), 422, "valid integer"),
    ("POST", "/v1/rollback", b'{"version": -1}', 422, "greater than or equal to 0"),
    ("POST", "/v1/snapshots/prune", b'{"keep_last": 0}', 422, "greater than or equal to 1"),
    ("GET", "/no/such/path", b"", 404, "Not Found"),
    ("GET", "/v1/inject", b"", 405, "Method Not Allowed"),
    ("DELETE", "/v1/memory", b"", 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "detail"), MALFORMED,
                         ids=[f"{m} {p} {b[:24]!r}" for m, p, b, *_ in MALFORMED])
def test_malformed_requests_get_a_4xx_with_the_reason(api, server, method, path, body, status, detail):
    headers = {**AUTHORIZED, "Content-Type": "application/json"}
    response = httpx.request(method, f"{server.url}{path}", content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:300]
    assert detail in response.text, response.text[:300]
    assert_clear_refusal(response, path)
    if status not in (404, 405):  # no such operation to declare them
        assert_declared(api, method, path, response)


def test_a_first_context_shorter_than_k_tokens_into_an_empty_memory_is_applied(server):
    """An empty memory (here after a rollback to version 0) tiles the first context's k = min(K, T) new tokens
    over the pool; the bank keeps that short entry."""
    emptied = httpx.post(f"{server.url}/v1/rollback", json={"version": 0}, headers=AUTHORIZED, timeout=60)
    assert emptied.status_code == 200, emptied.text
    assert httpx.get(f"{server.url}/v1/memory").json()["injections"] == 0
    doc = {"doc_id": "short-first", "text": "hi", "topic": "ckl.docs", "partition": 0, "offset": 0}
    response = httpx.post(f"{server.url}/v1/inject", json={"documents": [doc]}, headers=AUTHORIZED,
                          timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["applied"] == ["short-first"]
    assert httpx.get(f"{server.url}/v1/memory").json()["injections"] == 1


def test_a_body_declared_over_the_limit_is_refused_before_it_is_read(server):
    limit = httpx.get(f"{server.url}/v1/health").json()["limits"]["max_body_bytes"]
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    try:  # the headers only: the server must answer without waiting for the body
        connection.putrequest("POST", "/v1/inject")
        for name, value in {**AUTHORIZED, "Content-Type": "application/json",
                            "Content-Length": str(limit + 1)}.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert f"over the limit of {limit}" in json.loads(response.read())["detail"]
    finally:
        connection.close()
