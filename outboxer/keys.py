"""Where a key comes from, when it is not the payload: a header, or a field of the body.

    @consumer.handler(PaymentWebhook, dedup_key=outboxer.from_header("x-webhook-id"))

    @consumer.adapter(
        PaymentReceived, queue="webhooks", message_id=outboxer.from_header("x-webhook-id")
    )

A webhook's id usually arrives as a header, beside the payload rather than in it.
:func:`from_header` names one: the inbox deduplicates on its value, or an inbound adapter
takes it as the message id. :func:`from_body` names a top-level field of a JSON body,
for an adapter whose messages carry their id inside. Header names compare without
regard to case, as HTTP's do (a forwarder may change the case on the way).

What a key *is* is decided here too (:func:`key_text`): text, compared exactly; a value
whose text identifies nothing is refused (:class:`DedupKeyError`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from .errors import ConfigurationError, HandlerMisuse

__all__ = ["DedupKeyError", "FromBody", "FromHeader", "from_body", "from_header", "key_text"]

_NAME_LIMIT = 255

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


class DedupKeyError(HandlerMisuse):
    """A handler's dedup key is a value that identifies nothing (a bool, a float, a dict,
    an object whose text holds its address): every run would get the same, so the message
    is dead-lettered at once, with this reason, instead of being taken for another."""


def key_text(value: object, handler: str) -> str | None:
    """The text of a dedup key value; None for no key (None, or text that is empty or only
    whitespace). Keys are compared as text: ``1`` and ``"1"`` are one key.

    Raises :class:`DedupKeyError` for a value whose text is no identity: ``True`` (every
    message with it would be one), a float (``1.0`` is not ``1``; every NaN would be one),
    a Decimal NaN or infinity, a dict or a set (their text depends on the order of their
    items, a set's on the process; also inside a tuple or a list), or an object whose text
    holds its address (new at every run: no redelivery would ever be a duplicate).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    problem = _no_identity(value)
    text = ""
    if problem is None:
        try:
            text = str(value)
        except ValueError as exc:
            if "integer string conversion" not in str(exc):
                raise  # the key's own __str__ failed: the handler's failure, retried
            # No passing failure: Python turns no int this long into text, at any attempt.
            problem = (
                f"an int of more than {sys.get_int_max_str_digits()} digits, which Python "
                "does not turn into text (return it as a str)"
            )
    if problem is None and _ADDRESS.search(text):
        problem = f"a {type(value).__name__} whose text holds its address, new at every run"
    if problem is not None:
        raise DedupKeyError(
            f"handler {handler}: its dedup key is {problem}; return a str or an int (or "
            "None for no key: the message id)"
        )
    return text if text.strip() else None


def _no_identity(value: object) -> str | None:
    """Why ``value`` identifies nothing (or a tuple or list holding a set or a dict), else
    None."""
    if isinstance(value, bool):
        return "a bool, which would make every message with it one"
    if isinstance(value, (float, complex)):
        return f"a {type(value).__name__}, whose text is no id (1.0 is not 1; NaN is NaN)"
    if isinstance(value, Decimal) and not value.is_finite():
        return f"Decimal({str(value)!r}), which would make every message with it one"
    if isinstance(value, (Mapping, set, frozenset)):
        return f"a {type(value).__name__}, whose text depends on the order of its items"
    if isinstance(value, (tuple, list)):
        # Its items are parts of one key (a bool or a number among them tells keys apart),
        # but the text of a set or a dict among them is no more stable than alone.
        for item in value:
            problem = _no_identity(item)
            if problem is not None and isinstance(item, (Mapping, set, frozenset, tuple, list)):
                return f"a {type(value).__name__} holding {problem}"
    return None


@dataclass(frozen=True)
class FromHeader:
    """A key read from the message header ``name`` (see :func:`from_header`)."""

    name: str

    def value(self, headers: Mapping[str, str]) -> str | None:
        """The header's value, or None when the message does not carry it (or it is empty,
        or only whitespace: a blank value identifies nothing)."""
        found = headers.get(self.name)
        if found is None:
            wanted = self.name.lower()
            found = next((v for k, v in headers.items() if k.lower() == wanted), None)
        return found if found and found.strip() else None

    def __str__(self) -> str:
        return f"header {self.name!r}"


@dataclass(frozen=True)
class FromBody:
    """A key read from the top-level field ``field`` of a JSON object body."""

    field: str

    def value(self, body: bytes) -> str | None:
        """The field's value as text (a number as JSON writes it: ``7`` and ``"7"`` are one
        id); None when the body has no such field, or it is null, blank text, or no id at
        all (true or false, a number with a fraction or an exponent, an object, an array).
        Raises ValueError when the body is not a JSON object."""
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError(f"the body is a JSON {type(document).__name__}, not an object")
        found = document.get(self.field)
        if isinstance(found, str):
            return found if found.strip() else None
        if isinstance(found, int) and not isinstance(found, bool):
            return str(found)
        return None

    def __str__(self) -> str:
        return f"body field {self.field!r}"


def from_header(name: str) -> FromHeader:
    """The value of header ``name`` (compared without regard to case) as a key."""
    if not isinstance(name, str) or not name.strip() or len(name) > _NAME_LIMIT:
        raise ConfigurationError(
            f"from_header() needs a header name of 1-{_NAME_LIMIT} characters, got {name!r}"
        )
    return FromHeader(name)


def from_body(field: str) -> FromBody:
    """The value of the top-level field ``field`` of a JSON object body as a key."""
    if not isinstance(field, str) or not field:
        raise ConfigurationError(f"from_body() needs a field name, got {field!r}")
    return FromBody(field)
