"""Parsing of one raw document message (topic `ckl.docs`): bytes in, a Document out, or an InvalidDocument
naming the field and the reason (what ingestion dead-letters).

The raw message is checked first (UTF-8, JSON, nesting depth, integers Python can convert, an object,
no duplicate keys: JSON parsers keep only the last one), then validated with the model
(documents.model). The first broken rule is reported as `field: reason`; `field` is a field name, an
item path such as "probes[1].answer", or "$" when the message as a whole is unusable.
"""

import json
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from documents.model import DEFAULT_MAX_TEXT_CHARS, TEXT_LIMIT, BlankText, Document, NotIsoTimestamp, Probe

WHOLE_MESSAGE = "$"
FIELDS = tuple(Document.model_fields)
EMPTY = "empty (must contain non-whitespace text)"


class InvalidDocument(ValueError):
    """A message that is not a valid document; names the offending field and the reason."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_document(raw: bytes, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> Document:
    """Decode and validate one message; raises InvalidDocument naming the field and the reason."""
    message = _decode_object(raw)
    try:
        return Document.model_validate(message, context={TEXT_LIMIT: max_text_chars})
    except ValidationError as error:
        first = _first(error.errors())
        raise InvalidDocument(_path(first["loc"]), _reason(first)) from None


# ------------------------------------------------------------------------------------------ the raw message


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


# ------------------------------------------------------------------------------- pydantic errors, as reasons


def _first(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error to report: within an object its unknown fields first (by name), then its fields in order;
    a field's own error before its items' errors."""
    order: dict[tuple, int] = {}
    for error in errors:
        for depth in range(1, len(error["loc"]) + 1):
            order.setdefault(error["loc"][:depth], len(order))

    def rank(error: ErrorDetails) -> tuple:
        loc, unknown = error["loc"], error["type"] == "extra_forbidden"
        steps = [(1, "", order[loc[:depth]]) for depth in range(1, len(loc))]
        return (*steps, (0, str(loc[-1]), 0) if unknown else (1, "", order[loc]))

    return min(errors, key=rank)


def _path(loc: tuple[int | str, ...]) -> str:
    """("probes", 1, "answer") -> "probes[1].answer"; an unknown key is named as sent, even ""."""
    if not loc:
        return WHOLE_MESSAGE
    head, *rest = loc
    return str(head) + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest)


def _reason(error: ErrorDetails) -> str:
    """One pydantic error in the words of the dead-letter reason (its own message for an unexpected one)."""
    kind, value = error["type"], error["input"]
    cause = error.get("ctx", {}).get("error")
    if kind == "missing":
        return "missing (required)"
    if kind == "string_type":
        return f"expected a string, got {_json_type(value)}"
    if kind == "string_too_short" or isinstance(cause, BlankText):
        return EMPTY
    if isinstance(cause, NotIsoTimestamp):
        return f"not an ISO-8601 date or date-time: {value!r}"
    if kind == "string_too_long":
        return f"{len(value)} characters, over the limit of {error['ctx']['max_length']}"
    if kind == "string_unicode":
        return f"unpaired surrogate escape at character {_first_surrogate(value)}"
    if kind == "list_type":
        return f"expected a list of question/answer objects, got {_json_type(value)}"
    if kind == "too_long":
        return f"{len(value)} {error['loc'][-1]}, over the limit of {error['ctx']['max_length']}"
    if kind == "model_type":
        return f"expected a question/answer object, got {_json_type(value)}"
    if kind == "extra_forbidden":
        allowed = FIELDS if len(error["loc"]) == 1 else tuple(Probe.model_fields)
        return f"unknown field (allowed: {', '.join(allowed)})"
    return error["msg"]


def _first_surrogate(value: str) -> int:
    """Where a string stops being encodable as UTF-8: its first unpaired surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return 0


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]
