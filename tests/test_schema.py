"""Validation of the document message: every rejection names the field and the reason."""

import json

import pytest
from pydantic import ValidationError

from documents.model import Document, Probe
from documents.parse import InvalidDocument, parse_document

VALID = {
    "doc_id": "d-1",
    "text": "The Rhine flows into the North Sea.",
    "source": "atlas",
    "published_at": "2024-05-01T12:00:00Z",
    "probes": [{"question": "Where does the Rhine flow?", "answer": "The North Sea"}],
}


def encode(message) -> bytes:
    return json.dumps(message).encode()


def with_fields(**changes) -> bytes:
    return encode({**VALID, **changes})


def without(name: str) -> bytes:
    return encode({k: v for k, v in VALID.items() if k != name})


def test_valid_document_parses_into_typed_fields():
    doc = parse_document(encode(VALID))
    assert doc == Document(
        doc_id="d-1",
        text="The Rhine flows into the North Sea.",
        source="atlas",
        published_at="2024-05-01T12:00:00Z",
        probes=(Probe(question="Where does the Rhine flow?", answer="The North Sea"),),
    )


def test_only_doc_id_and_text_are_required_and_null_optionals_count_as_absent():
    doc = parse_document(encode({"doc_id": "x", "text": "t", "source": None, "probes": None}))
    assert doc == Document(doc_id="x", text="t")


@pytest.mark.parametrize(
    "doc",
    [
        Document(doc_id="x", text="only required"),
        Document(doc_id="ü-1", text="naïve — 東京", source="s", published_at="2024-01-02",
                 probes=(Probe(question="q1", answer="a1"), Probe(question="q2", answer="a2"))),
    ],
)
def test_to_json_round_trips(doc):
    assert parse_document(doc.to_json().encode()) == doc


def test_document_is_immutable():
    doc = parse_document(encode(VALID))
    with pytest.raises(ValidationError, match="frozen"):
        doc.text = "changed"


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (b'{"doc_id": "a", "text": ', "$", "not JSON"),
        (b"plain text", "$", "not JSON"),
        (b"", "$", "not JSON"),
        (b'{"doc_id": "a", "text": "caf\xe9"}', "$", "not valid UTF-8"),
        (b'["doc_id", "text"]', "$", "expected a JSON object, got array"),
        (b'"just a string"', "$", "expected a JSON object, got string"),
        (without("doc_id"), "doc_id", "missing"),
        (with_fields(doc_id=""), "doc_id", "empty"),
        (with_fields(doc_id="   "), "doc_id", "empty"),
        (without("text"), "text", "missing"),
        (with_fields(text=""), "text", "empty"),
        (with_fields(text="\n\t "), "text", "empty"),
        (with_fields(doc_id=42), "doc_id", "expected a string, got number"),
        (with_fields(doc_id=None), "doc_id", "expected a string, got null"),
        (with_fields(text=["a", "b"]), "text", "expected a string, got array"),
        (with_fields(text=True), "text", "expected a string, got boolean"),
        (with_fields(source={"name": "x"}), "source", "expected a string, got object"),
        (with_fields(published_at=20240501), "published_at", "expected a string, got number"),
        (with_fields(published_at="last Tuesday"), "published_at", "not an ISO-8601"),
        (with_fields(published_at="2024-13-01"), "published_at", "not an ISO-8601"),
        (with_fields(probes="q?"), "probes", "expected a list"),
        (with_fields(probes=[["q", "a"]]), "probes[0]", "expected a question/answer object"),
        (with_fields(probes=[{"question": "q"}]), "probes[0].answer", "missing"),
        (with_fields(probes=[{"question": "q", "answer": "a"}, {"question": "", "answer": "a"}]),
         "probes[1].question", "empty"),
        (with_fields(probes=[{"question": "q", "answer": 7}]), "probes[0].answer", "expected a string"),
        (with_fields(probes=[{"question": "q", "answer": "a", "hint": "h"}]),
         "probes[0].hint", "unknown field"),
        (with_fields(txt="typo of text"), "txt", "unknown field"),
        (b'{"doc_id": "a", "text": "one", "text": "two"}', "text", "duplicate field"),
        (b'{"doc_id": "a", "text": "broken \\ud800 pair"}', "text", "unpaired surrogate"),
        (b"[" * 100_000, "$", "nested too deeply"),
    ],
)
def test_invalid_message_is_rejected_naming_field_and_reason(raw, field, reason):
    with pytest.raises(InvalidDocument) as caught:
        parse_document(raw)
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{field}: ")


def test_text_over_the_configured_limit_is_rejected_and_at_the_limit_accepted():
    assert parse_document(with_fields(text="x" * 100), max_text_chars=100).text == "x" * 100
    with pytest.raises(InvalidDocument) as caught:
        parse_document(with_fields(text="x" * 101), max_text_chars=100)
    assert caught.value.field == "text"
    assert "101 characters, over the limit of 100" in caught.value.reason


def test_limit_counts_characters_not_bytes():
    assert parse_document(with_fields(text="é" * 100), max_text_chars=100).text == "é" * 100
