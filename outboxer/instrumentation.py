"""The hook points tracing and metrics attach to.

Lower layers (publishing, relay, consumer) call the active :class:`Instrumentation`;
the default does nothing and costs a method call. :mod:`outboxer.tracing` installs an
OpenTelemetry implementation when the ``otel`` extra is present. Keeping the interface
here means no module below ``tracing`` imports OpenTelemetry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .message import Envelope

__all__ = [
    "HandlerOutcome",
    "Instrumentation",
    "SpanHandle",
    "TransportDescription",
    "get",
    "install",
]


@dataclass(frozen=True)
class TransportDescription:
    """What tracing needs to know about a broker: its semconv system name and attributes."""

    system: str
    """``rabbitmq``, ``aws_sqs`` or ``memory``."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """Extra attributes for every span of this transport (server address and port...)."""

    def destination_attributes(self, destination: str, routing_key: str | None) -> dict[str, Any]:
        """Attributes naming ``destination`` the way this broker's conventions do."""
        return {}


class HandlerOutcome:
    """Values of the ``outboxer.handler.outcome`` span attribute."""

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    RETRY_SCHEDULED = "retry_scheduled"
    DEAD_LETTERED = "dead_lettered"
    ERROR_CHANNEL = "error_channel"
    """Gave up, and an error channel with ``dead_letter=False`` took the message."""
    SKIPPED = "skipped"


class SpanHandle:
    """A started span as the layers below tracing see it: attributes, errors, trace headers."""

    def set_attribute(self, key: str, value: Any) -> None:
        """Set an attribute on the span."""

    def record_error(self, exc: BaseException) -> None:
        """Mark the span failed by ``exc``."""

    def trace_headers(self) -> dict[str, str]:
        """W3C ``traceparent``/``tracestate`` of this span, to store with a message."""
        return {}


_NOOP_SPAN = SpanHandle()


class Instrumentation:
    """No-op instrumentation; :mod:`outboxer.tracing` overrides every method."""

    enabled = False

    def create(self, envelope: Envelope) -> dict[str, str]:
        """Called by ``publish()``: returns the creation context to store with the message."""
        return {}

    @contextlib.contextmanager
    def send(
        self,
        transport: TransportDescription,
        destination: str,
        envelopes: Sequence[Envelope],
    ) -> Iterator[SpanHandle]:
        """Around one relay send of ``envelopes`` to one destination."""
        yield _NOOP_SPAN

    @contextlib.contextmanager
    def process(
        self, transport: TransportDescription, envelope: Envelope, consumer: str
    ) -> Iterator[SpanHandle]:
        """Around the consumer's processing of one delivered message."""
        yield _NOOP_SPAN

    @contextlib.contextmanager
    def handler(self, envelope: Envelope, handler: str, attempt: int) -> Iterator[SpanHandle]:
        """Around one run of one handler (its own transaction)."""
        yield _NOOP_SPAN

    @contextlib.contextmanager
    def step(
        self, name: str, envelope: Envelope | None, attributes: Mapping[str, Any] | None = None
    ) -> Iterator[SpanHandle]:
        """Around a bookkeeping step: scheduling a retry, dead-lettering."""
        yield _NOOP_SPAN

    @contextlib.contextmanager
    def replay(
        self,
        trace_headers: Mapping[str, str],
        attributes: Mapping[str, Any],
    ) -> Iterator[SpanHandle]:
        """Around replaying one dead letter: continues the dead letter's trace."""
        yield _NOOP_SPAN

    # Metrics -----------------------------------------------------------------
    def relay_batch(self, *, sent: int, retried: int, dead_lettered: int, duration: float) -> None:
        """After a relay batch is settled."""

    def handler_done(self, handler: str, outcome: str, duration: float) -> None:
        """After a handler run (or skip) is recorded."""

    def observe_outbox(self, callback: Any) -> None:
        """Register a callback that reads backlog figures (for observable gauges)."""


_active: list[Instrumentation] = [Instrumentation()]


def get() -> Instrumentation:
    """The instrumentation in use."""
    return _active[0]


def install(instrumentation: Instrumentation) -> Instrumentation:
    """Make ``instrumentation`` the one in use; returns the previous one."""
    previous = _active[0]
    _active[0] = instrumentation
    return previous
