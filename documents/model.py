"""The document model: the message of topic `ckl.docs` (docs/design.md) and the body of an injected document.

A document is one JSON object:

    {"doc_id": str, required, non-blank, at most 512 characters (unique: downstream skips doc_ids it
               already has),
     "text": str, required, non-blank, at most `max_text_chars` characters (a runtime limit, see below),
     "source": str, optional, at most 256 characters,
     "published_at": ISO-8601 date or date-time str, optional,
     "probes": [{"question": str, "answer": str}, ...], optional, at most 100, both non-blank, at most
               2,000 characters each}

The same rules hold on the topic (documents.parse) and at the model server (serving.schemas extends
`Document`), so a document the topic accepts is never refused by the server.

Unknown fields are REJECTED rather than kept or dropped: a typo such as "txt" or "published" would
otherwise lose data silently. Values of another type are rejected rather than coerced (strict mode).
`null` counts as absent for the optional fields only; absent probes are `()`. Strings with an unpaired
surrogate (a lone \\uD800-\\uDFFF escape in JSON) are rejected too, as pydantic's "string_unicode": they
cannot be encoded back to UTF-8 (pydantic itself refuses them only in strings with a length rule).

The text limit is a runtime setting: validation applies it when the validation context carries it under
TEXT_LIMIT (`Document.model_validate(message, context={TEXT_LIMIT: 1000})`), and not otherwise.
"""

import json
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo
from pydantic_core import PydanticKnownError

MAX_DOC_ID_CHARS, MAX_SOURCE_CHARS = 512, 256
MAX_PROBES, MAX_PROBE_CHARS = 100, 2_000  # probes per document; characters of a question or an answer
DEFAULT_MAX_TEXT_CHARS = 200_000  # the topic's and the server's default text limit
TEXT_LIMIT = "max_text_chars"  # the validation-context key of the text limit


class BlankText(ValueError):
    """A required text that is empty or only whitespace."""


class NotIsoTimestamp(ValueError):
    """A timestamp that `datetime.fromisoformat` cannot read."""


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticKnownError("string_unicode") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise BlankText("must contain non-whitespace text")
    return value


def _iso_timestamp(value: str) -> str:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise NotIsoTimestamp("must be an ISO-8601 date or date-time") from None
    return value


def _within_text_limit(value: str, info: ValidationInfo) -> str:
    """The runtime text limit, when the validation context has one (shaped like pydantic's max_length)."""
    limit = (info.context or {}).get(TEXT_LIMIT)
    if limit is not None and len(value) > limit:
        raise PydanticKnownError("string_too_long", {"max_length": limit})
    return value


def _probes_as_tuple(value: object) -> object:
    """null as no probes, a list (a JSON array) as a tuple; at most MAX_PROBES, counted before the probes
    are validated. The errors are pydantic's for a list, as the HTTP API has always reported them."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise PydanticKnownError("list_type")
    if len(value) > MAX_PROBES:
        context = {"field_type": "List", "max_length": MAX_PROBES, "actual_length": len(value)}
        raise PydanticKnownError("too_long", context)
    return tuple(value)


# (length limits go right after `str`: pydantic applies them as string rules there, with string messages)
Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank), AfterValidator(_encodable)]
Source = Annotated[str, Field(max_length=MAX_SOURCE_CHARS), AfterValidator(_encodable)]
Timestamp = Annotated[str, AfterValidator(_encodable), AfterValidator(_iso_timestamp)]


class Probe(BaseModel):
    """A question whose answer the document teaches; used to track retention."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    question: Text = Field(max_length=MAX_PROBE_CHARS)
    answer: Text = Field(max_length=MAX_PROBE_CHARS)


# a tuple, built from a list or null too (strict mode alone takes only a tuple from Python); its JSON
# schema is the input's: an array of at most MAX_PROBES probes, or null
ProbesInput = Annotated[list[Probe], Field(max_length=MAX_PROBES)] | None
Probes = Annotated[tuple[Probe, ...], BeforeValidator(_probes_as_tuple, json_schema_input_type=ProbesInput)]


class Document(BaseModel):
    """One validated document."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    doc_id: Text = Field(
        max_length=MAX_DOC_ID_CHARS, description="Unique id; a doc_id already applied is skipped."
    )
    text: Annotated[Text, AfterValidator(_within_text_limit)] = Field(
        description="The document text; injected as consecutive contexts."
    )
    source: Source | None = None
    published_at: Timestamp | None = Field(None, description="ISO-8601 date or date-time.")
    probes: Probes = Field((), description="Questions the document answers (kept in the bank).")

    def to_json(self) -> str:
        """The document as a message, without its absent optional fields; `parse_document` gives it back."""
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), ensure_ascii=False)
