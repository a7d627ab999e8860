"""The document message of topic `ckl.docs` (DESIGN.md) and its validation.

A message is one UTF-8 JSON object:

    {"doc_id": str, required, non-blank, at most 512 characters (unique: downstream skips doc_ids it
               already has),
     "text": str, required, non-blank, at most `max_text_chars` characters,
     "source": str, optional, at most 256 characters,
     "published_at": ISO-8601 date or date-time str, optional,
     "probes": [{"question": str, "answer": str}, ...], optional, at most 100, both non-blank, at most
               2,000 characters each}

The field limits are the model server's (serving.schemas), so a document the topic accepts is never
refused by the server.

Unknown fields are REJECTED rather than kept or dropped: a typo such as "txt" or "published" would
otherwise lose data silently. Duplicate keys in the object are rejected for the same reason (JSON
parsers keep only the last one). `null` counts as absent for the optional fields only.

`parse_document` raises `InvalidDocument(field, reason)`; `field` is a field name, an item path such
as "probes[1].answer", or "$" when the message as a whole is unusable (not UTF-8, not JSON, not an
object).
"""

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from serving.schemas import MAX_DOC_ID_CHARS, MAX_PROBE_CHARS, MAX_PROBES, MAX_SOURCE_CHARS

DEFAULT_MAX_TEXT_CHARS = 200_000
WHOLE_MESSAGE = "$"
FIELDS = ("doc_id", "text", "source", "published_at", "probes")


class InvalidDocument(ValueError):
    """A message that is not a valid document; names the offending field and the reason."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Probe:
    """A question whose answer the document teaches; used to track retention."""

    question: str
    answer: str


@dataclass(frozen=True)
class Document:
    """One validated document."""

    doc_id: str
    text: str
    source: str | None = None
    published_at: str | None = None
    probes: tuple[Probe, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        """The document as a message; `parse_document(doc.to_json().encode())` gives it back."""
        message: dict[str, Any] = {"doc_id": self.doc_id, "text": self.text}
        if self.source is not None:
            message["source"] = self.source
        if self.published_at is not None:
            message["published_at"] = self.published_at
        if self.probes:
            message["probes"] = [{"question": p.question, "answer": p.answer} for p in self.probes]
        return json.dumps(message, ensure_ascii=False)


def parse_document(raw: bytes, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> Document:
    """Decode and validate one message; raises InvalidDocument naming the field and the reason."""
    message = _decode_object(raw)
    unknown = sorted(set(message) - set(FIELDS))
    if unknown:
        raise InvalidDocument(unknown[0], f"unknown field (allowed: {', '.join(FIELDS)})")
    return Document(
        doc_id=_required_text(message, "doc_id", max_chars=MAX_DOC_ID_CHARS),
        text=_required_text(message, "text", max_chars=max_text_chars),
        source=_optional_str(message, "source", MAX_SOURCE_CHARS),
        published_at=_optional_timestamp(message, "published_at"),
        probes=_optional_probes(message, "probes"),
    )


def _decode_object(raw: bytes) -> dict[str, Any]:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        reason = f"not valid UTF-8 ({error.reason} at byte {error.start})"
        raise InvalidDocument(WHOLE_MESSAGE, reason) from None
    try:
        message = json.loads(decoded, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise InvalidDocument(WHOLE_MESSAGE, f"not JSON ({error.msg} at character {error.pos})") from None
    except RecursionError:
        raise InvalidDocument(WHOLE_MESSAGE, "not JSON (nested too deeply)") from None
    except InvalidDocument:
        raise
    except ValueError as error:  # JSON Python cannot decode: an integer of over 4300 digits
        raise InvalidDocument(WHOLE_MESSAGE, f"not usable JSON ({error})") from None
    if not isinstance(message, dict):
        raise InvalidDocument(WHOLE_MESSAGE, f"expected a JSON object, got {_json_type(message)}")
    return message


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidDocument(key, "duplicate field")
        result[key] = value
    return result


def _required_text(container: dict[str, Any], name: str, path: str | None = None,
                   max_chars: int | None = None) -> str:
    path = path or name
    if name not in container:
        raise InvalidDocument(path, "missing (required)")
    value = container[name]
    if not isinstance(value, str):
        raise InvalidDocument(path, f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise InvalidDocument(path, "empty (must contain non-whitespace text)")
    return _valid_unicode(_within(value, path, max_chars), path)


def _optional_str(message: dict[str, Any], name: str, max_chars: int | None = None) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidDocument(name, f"expected a string, got {_json_type(value)}")
    return _valid_unicode(_within(value, name, max_chars), name)


def _within(value: str, path: str, max_chars: int | None) -> str:
    if max_chars is not None and len(value) > max_chars:
        raise InvalidDocument(path, f"{len(value)} characters, over the limit of {max_chars}")
    return value


def _valid_unicode(value: str, path: str) -> str:
    """Reject strings that cannot be encoded back to UTF-8 (unpaired \\uD800-\\uDFFF escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidDocument(path, f"unpaired surrogate escape at character {error.start}") from None
    return value


def _optional_timestamp(message: dict[str, Any], name: str) -> str | None:
    value = _optional_str(message, name)
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise InvalidDocument(name, f"not an ISO-8601 date or date-time: {value!r}") from None
    return value


def _optional_probes(message: dict[str, Any], name: str) -> tuple[Probe, ...]:
    value = message.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidDocument(name, f"expected a list of question/answer objects, got {_json_type(value)}")
    if len(value) > MAX_PROBES:
        raise InvalidDocument(name, f"{len(value)} probes, over the limit of {MAX_PROBES}")
    probes = []
    for index, item in enumerate(value):
        path = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise InvalidDocument(path, f"expected a question/answer object, got {_json_type(item)}")
        unknown = sorted(set(item) - {"question", "answer"})
        if unknown:
            raise InvalidDocument(f"{path}.{unknown[0]}", "unknown field (allowed: question, answer)")
        probes.append(
            Probe(
                question=_required_text(item, "question", f"{path}.question", MAX_PROBE_CHARS),
                answer=_required_text(item, "answer", f"{path}.answer", MAX_PROBE_CHARS),
            )
        )
    return tuple(probes)


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]
