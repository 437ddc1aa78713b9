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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["FromBody", "FromHeader", "from_body", "from_header"]

_NAME_LIMIT = 255


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
