"""Property-based tests of the document message (documents.parse) with hypothesis: whatever bytes arrive,
`parse_document` returns a valid Document or raises InvalidDocument naming the field and the reason
(what ingestion dead-letters), never anything else. See docs/bad_input.md."""

import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from documents.model import Document, Probe
from documents.parse import FIELDS, WHOLE_MESSAGE, InvalidDocument, parse_document

LIMIT = 64  # max_text_chars of these tests: small, so over-long texts are cheap to generate
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WHITESPACE = [chr(code) for code in range(0x110000) if chr(code).isspace()]

# --------------------------------------------------------------------------------------------- strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
blank = st.text(st.sampled_from(WHITESPACE), max_size=8)
non_blank = st.text(min_size=1, max_size=30).filter(str.strip)
timestamps = (
    st.dates().map(lambda d: d.isoformat())
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda t: t.isoformat())
    | st.datetimes().map(lambda t: t.isoformat(sep=" ", timespec="seconds"))
)
probes = st.builds(Probe, question=non_blank, answer=non_blank)
documents = st.builds(
    Document,
    doc_id=non_blank,
    text=st.text(min_size=1, max_size=LIMIT).filter(str.strip),
    source=st.none() | st.text(max_size=30),
    published_at=st.none() | timestamps,
    probes=st.lists(probes, max_size=3).map(tuple),
)
# A message-shaped object: known and unknown keys, any JSON values.
message_objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=7)


def parse_or_reason(raw: bytes, max_text_chars: int = LIMIT) -> Document | InvalidDocument:
    """The document, or the InvalidDocument raised: any other exception fails the test."""
    try:
        return parse_document(raw, max_text_chars)
    except InvalidDocument as error:
        return error


def message(doc: Document) -> dict[str, Any]:
    return json.loads(doc.to_json())


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def is_iso(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def assert_valid(doc: Document) -> None:
    """What a parsed document guarantees downstream."""
    assert doc.doc_id.strip() and doc.text.strip() and len(doc.text) <= LIMIT
    for text in (doc.doc_id, doc.text, doc.source or ""):
        text.encode("utf-8")  # no unpaired surrogates: the bank and Kafka headers can store it
    assert doc.published_at is None or is_iso(doc.published_at)
    assert all(probe.question.strip() and probe.answer.strip() for probe in doc.probes)


def assert_rejected(raw: bytes, field: str, reason: str, max_text_chars: int = LIMIT) -> None:
    with pytest.raises(InvalidDocument) as caught:
        parse_document(raw, max_text_chars)
    assert caught.value.field == field and reason in caught.value.reason, caught.value
    assert str(caught.value) == f"{field}: {caught.value.reason}"


# -------------------------------------------------------------------------------- any input: a doc or a why


@BOUNDED
@given(raw=st.binary(max_size=200) | json_values.map(encode) | message_objects.map(encode))
@example(raw=b'{"doc_id": "a", "text": "b", "source": ' + b"7" * 5000 + b"}")  # int over Python's 4300 digits
@example(raw=b"[" * 100_000)
@example(raw=b'{"doc_id": "a", "text": "b", "source": "\\udfff"}')
@example(raw=b"\xef\xbb\xbf{}")  # a byte-order mark
def test_any_bytes_give_a_valid_document_or_a_named_reason(raw):
    outcome = parse_or_reason(raw)
    if isinstance(outcome, Document):
        assert_valid(outcome)
        assert parse_document(outcome.to_json().encode(), LIMIT) == outcome
        return
    assert isinstance(outcome.reason, str) and outcome.reason.strip()
    outcome.reason.encode("utf-8")  # the dead-letter header carries it (the field is backslash-escaped)
    if outcome.reason.startswith("unknown field"):  # named by the key as sent, even "" or "  "
        assert outcome.field in json.loads(raw) or outcome.field.startswith("probes["), outcome
    elif outcome.reason != "duplicate field":  # (also the key as sent, at any depth)
        assert outcome.field == WHOLE_MESSAGE or outcome.field.split("[")[0] in FIELDS, outcome


@BOUNDED
@given(st.data())
def test_a_message_object_is_rejected_exactly_when_a_rule_is_broken(data):
    """Objects with arbitrary values under known keys: the parser's verdict matches the rules in the
    module docstring, checked independently here."""
    obj = data.draw(st.fixed_dictionaries(
        {"doc_id": non_blank | json_values, "text": non_blank | json_values},
        optional={"source": json_values, "published_at": timestamps | json_values,
                  "probes": st.lists(st.fixed_dictionaries({"question": non_blank | json_values,
                                                            "answer": non_blank | json_values}), max_size=2)
                  | json_values},
    ))
    outcome = parse_or_reason(encode(obj))

    def text_ok(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def timestamp_ok(value: Any) -> bool:
        try:
            return value is None or bool(datetime.fromisoformat(value))
        except (TypeError, ValueError):
            return False

    def probes_ok(value: Any) -> bool:
        return value is None or isinstance(value, list) and all(
            isinstance(p, dict) and set(p) == {"question", "answer"} and text_ok(p["question"])
            and text_ok(p["answer"]) for p in value)

    valid = (text_ok(obj["doc_id"]) and text_ok(obj["text"]) and len(obj["text"]) <= LIMIT
             and isinstance(obj.get("source"), str | None) and timestamp_ok(obj.get("published_at"))
             and probes_ok(obj.get("probes")))
    assert isinstance(outcome, Document) == valid, (obj, outcome)


# ------------------------------------------------------------------------------------- valid round trips


@BOUNDED
@given(documents)
def test_valid_documents_round_trip_through_to_json(doc):
    assert parse_document(doc.to_json().encode(), LIMIT) == doc
    ascii_only = json.dumps(message(doc), ensure_ascii=True).encode()  # \\u escapes decode the same
    assert parse_document(ascii_only, LIMIT) == doc


@BOUNDED
@given(documents)
def test_null_optionals_count_as_absent(doc):
    nulls = {"source": None, "published_at": None, "probes": None}
    assert parse_document(encode({"doc_id": doc.doc_id, "text": doc.text, **nulls}), LIMIT) == \
        Document(doc_id=doc.doc_id, text=doc.text)


# ------------------------------------------------------------------------ each broken rule names its field


@BOUNDED
@given(documents, st.integers(1, 100))
def test_text_over_the_limit_is_rejected(doc, extra):
    over = message(doc) | {"text": "é" * (LIMIT + extra)}
    assert_rejected(encode(over), "text", f"{LIMIT + extra} characters, over the limit of {LIMIT}")


@BOUNDED
@given(documents, st.sampled_from(["doc_id", "text"]), blank)
def test_blank_or_missing_required_text_is_rejected(doc, name, value):
    assert_rejected(encode(message(doc) | {name: value}), name, "empty (must contain non-whitespace text)")
    missing = {key: v for key, v in message(doc).items() if key != name}
    assert_rejected(encode(missing), name, "missing (required)")


@BOUNDED
@given(documents, st.sampled_from(["doc_id", "text", "source", "published_at"]),
       json_values.filter(lambda v: not isinstance(v, str) and v is not None))
def test_a_string_field_of_another_type_is_rejected(doc, name, value):
    kind = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}[type(value)]
    assert_rejected(encode(message(doc) | {name: value}), name, f"expected a string, got {kind}")


@BOUNDED
@given(documents, st.sampled_from(["doc_id", "text", "source", "published_at"]),
       st.text(max_size=5), st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]))
def test_an_unpaired_surrogate_escape_is_rejected(doc, name, prefix, surrogate):
    raw = encode(message(doc) | {name: f"{prefix}{surrogate}x"})  # json.dumps writes it as \\udXXX
    assert_rejected(raw, name, f"unpaired surrogate escape at character {len(prefix)}")


@BOUNDED
@given(documents, st.text(max_size=30).filter(lambda value: not is_iso(value)))
def test_published_at_must_be_iso_8601(doc, value):
    assert_rejected(encode(message(doc) | {"published_at": value}), "published_at", "not an ISO-8601")


@BOUNDED
@given(documents, st.text(min_size=1, max_size=12).filter(lambda key: key not in FIELDS), json_values)
def test_an_unknown_field_is_rejected_by_name(doc, key, value):
    assert_rejected(encode(message(doc) | {key: value}), key, "unknown field (allowed: doc_id, text, ")


@BOUNDED
@given(documents, st.sampled_from(FIELDS))
def test_a_repeated_field_is_rejected(doc, name):
    body = doc.to_json()[1:-1]  # holds doc_id and text at least
    assert_rejected(f'{{{body}, "{name}": null, "{name}": null}}'.encode(), name, "duplicate field")


probe_faults = st.sampled_from([
    # (probes value given one valid probe p, the field named, the reason)
    (lambda p: p, "probes", "expected a list"),
    (lambda p: [p, "q?"], "probes[1]", "expected a question/answer object, got string"),
    (lambda p: [{"question": p["question"]}], "probes[0].answer", "missing (required)"),
    (lambda p: [{"answer": p["answer"]}], "probes[0].question", "missing (required)"),
    (lambda p: [p, {**p, "question": " \t"}], "probes[1].question", "empty"),
    (lambda p: [{**p, "answer": ["a"]}], "probes[0].answer", "expected a string, got array"),
    (lambda p: [{**p, "hint": "h"}], "probes[0].hint", "unknown field (allowed: question, answer)"),
])


@BOUNDED
@given(documents, probes, probe_faults)
def test_malformed_probes_are_rejected_naming_the_item(doc, probe, fault):
    make, field, reason = fault
    value = make({"question": probe.question, "answer": probe.answer})
    assert_rejected(encode(message(doc) | {"probes": value}), field, reason)


@BOUNDED
@given(documents, st.data())
def test_non_utf8_bytes_anywhere_are_rejected_as_a_whole(doc, data):
    raw = doc.to_json().encode()
    at = data.draw(st.integers(0, len(raw)))
    bad = data.draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"]))  # never valid UTF-8
    assert_rejected(raw[:at] + bad + raw[at:], WHOLE_MESSAGE, "not valid UTF-8")


@BOUNDED
@given(documents, st.data())
def test_a_truncated_message_is_not_json(doc, data):
    raw = doc.to_json().encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    assume(is_utf8(raw[:cut]))  # not cut inside a character
    assert_rejected(raw[:cut], WHOLE_MESSAGE, "not JSON")


@BOUNDED
@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object_is_rejected_as_a_whole(value):
    outcome = parse_or_reason(encode(value))
    assert isinstance(outcome, InvalidDocument) and outcome.field == WHOLE_MESSAGE
    assert outcome.reason.startswith("expected a JSON object, got ")


def test_an_integer_too_long_for_python_is_rejected_as_a_whole():
    raw = b'{"doc_id": "a", "text": "b", "source": ' + b"1" * 4301 + b"}"
    assert_rejected(raw, WHOLE_MESSAGE, "not usable JSON (Exceeds the limit (4300 digits)")



@pytest.mark.parametrize(("over", "at_the_limit", "field", "reason"), [
    ({"doc_id": "d" * 513}, {"doc_id": "d" * 512}, "doc_id", "513 characters, over the limit of 512"),
    ({"source": "s" * 257}, {"source": "s" * 256}, "source", "257 characters, over the limit of 256"),
    ({"probes": [{"question": "q?", "answer": "a"}] * 101},
     {"probes": [{"question": "q?", "answer": "a"}] * 100}, "probes", "101 probes, over the limit of 100"),
    ({"probes": [{"question": "q?", "answer": "a" * 2001}]},
     {"probes": [{"question": "q?", "answer": "a" * 2000}]}, "probes[0].answer",
     "2001 characters, over the limit of 2000"),
])
def test_fields_over_the_servers_limits_are_rejected_on_the_topic_already(over, at_the_limit, field, reason):
    """The model server's field limits hold on the topic too, so no valid message can fail its batch; a
    value exactly at the limit is accepted."""
    assert_rejected(encode({"doc_id": "d", "text": "t", **over}), field, reason)
    accepted = parse_document(encode({"doc_id": "d", "text": "t", **at_the_limit}), LIMIT)
    assert_valid(accepted)
    assert accepted.model_dump(mode="json", include=set(at_the_limit)) == at_the_limit
