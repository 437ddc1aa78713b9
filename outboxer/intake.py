"""Intake: a delivered message decoded, checked and matched to the handlers it is for.

Nothing a delivery carries may raise out of here: whatever cannot be used (no envelope,
fields the database cannot store, a payload that is not the handler's type, a retry
addressed to a handler of another type) becomes a :class:`Rejected` with the reason and
the dead letter to write. Outside publishers do not choose which handler runs or how
often: ``outboxer-handler`` selects only a handler of the message's own type, and
``outboxer-attempt`` is bounded to ``1..max_attempts``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import wire
from .errors import DecodeError
from .handler_address import own_name
from .handlers import HandlerRegistry, HandlerSpec
from .message import Envelope, registered_type
from .redaction import one_line
from .store.dead_letters import NewDeadLetter

__all__ = ["Prepared", "Rejected", "malformed_dead_letter", "prepare"]


@dataclass
class Prepared:
    """A delivered message, decoded and matched to the handlers it is for."""

    envelope: Envelope
    handlers: list[HandlerSpec]
    events: dict[str, Any] = field(default_factory=dict)
    """The decoded payload per handler id (handlers of one type share it: see
    :meth:`event_for`)."""
    first_attempt: int = 1
    decoders: dict[str, Callable[[], Any]] = field(default_factory=dict)
    """How to decode the payload again, per handler id."""
    handed_out: set[int] = field(default_factory=set)
    """The ids of the events already given to a run."""

    def event_for(self, handler_id: str) -> Any:
        """The decoded payload for one run of a handler (or its error channel): an object
        that no other handler of the message and no earlier run has been given, so that
        what a handler changes in its event (and then fails, or not) stays its own. The
        first run gets the one decoded at intake; later ones decode again."""
        event = self.events[handler_id]
        decode = self.decoders.get(handler_id)
        if decode is None or id(event) not in self.handed_out:
            self.handed_out.add(id(event))
            return event
        return decode()


@dataclass
class Rejected:
    """A delivered message that goes straight to the dead-letter table."""

    dead_letter: NewDeadLetter
    reason: str


def malformed_dead_letter(
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
    consumer: str,
    error_type: str,
    error: str,
    envelope: Envelope | None = None,
    handler: str | None = None,
) -> NewDeadLetter:
    """A message the consumer could not use at all (origin ``consumer``); ``handler`` names
    the one handler it was for, when it was for one (a replay then goes to it alone)."""
    return NewDeadLetter(
        origin="consumer",
        envelope=envelope,
        raw_body=body,
        raw_headers=dict(headers),
        destination=destination,
        consumer=consumer,
        error_type=error_type,
        error_message=error,
        attempts=1,
        handler=handler,
    )


def prepare(
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
    consumer: str,
    registry: HandlerRegistry,
) -> Prepared | Rejected:
    """Decode the envelope and the payload for each handler; any problem is a Rejected."""

    def reject(
        error_type: str, reason: str, envelope: Envelope | None = None, handler: str | None = None
    ) -> Rejected:
        letter = malformed_dead_letter(
            body, headers, destination, consumer, error_type, reason, envelope, handler
        )
        return Rejected(letter, reason)

    try:
        envelope = wire.decode(body, headers, destination)
    except DecodeError as exc:
        return reject("malformed_envelope", str(exc))
    except Exception as exc:  # nothing a delivery carries may raise out of the intake
        return reject("malformed_envelope", f"the envelope cannot be read: {one_line(exc)}")
    if envelope.handler is not None:
        # A retry or replay for a handler this consumer does not have (renamed, retired,
        # or another consumer's), or of another type: parked still addressed to it, so
        # that its replay goes to that handler alone, never to every handler of the type.
        addressed_to = own_name(envelope.handler, consumer)
        target = registry.by_id.get(envelope.handler)
        if target is None:
            return reject(
                "unknown_handler",
                f"message {envelope.message_id} is addressed to handler "
                f"{envelope.handler!r}, which consumer {consumer!r} does not have; "
                + _readdress(registry, envelope.type),
                envelope,
                addressed_to,
            )
        if target.type_name != envelope.type:
            return reject(
                "handler_type_mismatch",
                f"message {envelope.message_id} of type {envelope.type!r} is addressed to "
                f"handler {envelope.handler!r}, which handles {target.type_name!r} only; "
                + _readdress(registry, envelope.type),
                envelope,
                addressed_to,
            )
        targets = [target]
    else:
        targets = list(registry.by_type.get(envelope.type, ()))
    if not targets:
        known = registered_type(envelope.type)
        return reject(
            "unknown_type",
            f"consumer {consumer!r} has no handler for message type {envelope.type!r}"
            + ("" if known else " (no @outboxer.message registers that type here)"),
            envelope,
        )
    events: dict[str, Any] = {}
    decoded: dict[int, Any] = {}
    decoders: dict[str, Callable[[], Any]] = {}
    # A retry or replay that cannot be decoded stays addressed to its one handler.
    addressed = targets[0].name if envelope.handler is not None else None
    for handler in targets:
        key = 0 if handler.message_type is None else id(handler.message_type)
        try:
            if key not in decoded:
                if handler.message_type is None:
                    decoded[key] = json.loads(envelope.payload)
                else:
                    decoded[key] = handler.message_type.decode(envelope.payload)
        except DecodeError as exc:
            return reject("payload_mismatch", str(exc), envelope, addressed)
        except Exception as exc:  # not JSON, nested too deep, not UTF-8...
            problem = f"payload is not JSON: {one_line(exc)}"
            return reject("payload_mismatch", problem, envelope, addressed)
        events[handler.id] = decoded[key]
        decode = json.loads if handler.message_type is None else handler.message_type.decode
        decoders[handler.id] = partial(decode, envelope.payload)
    first = 1
    if envelope.handler is not None:
        # A retry says which run it is; an outside sender must not skip or repeat retries.
        first = max(1, min(envelope.attempt, targets[0].retry.max_attempts))
    return Prepared(envelope, targets, events, first, decoders)


def _readdress(registry: HandlerRegistry, message_type: str) -> str:
    """How to fix a letter addressed to a handler that cannot take it."""
    here = [spec.id for spec in registry.by_type.get(message_type, ())][:5]
    return (
        "deploy that handler and replay the dead letter, or replay it to the handler that "
        "does this work now: outboxer dead-letter replay ID --to-handler CONSUMER:HANDLER"
        + (f" (here {message_type!r} goes to {', '.join(here)})" if here else "")
    )
