"""outboxer's instrumentation hooks implemented with OpenTelemetry: the spans of a
message journey and the relay, handler and outbox metrics.

Part of :mod:`outboxer.tracing`, which describes the spans and installs these hooks;
:mod:`outboxer.tracecontext` converts the W3C trace context they store and continue.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .instrumentation import Instrumentation, SpanHandle, TransportDescription
from .tracecontext import _context_of, _headers_of, _link

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from .message import Envelope

__all__ = ["OpenTelemetryInstrumentation"]

log = logging.getLogger("outboxer.tracing")

SCOPE = "outboxer"


class _Span(SpanHandle):
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def set_attribute(self, key: str, value: Any) -> None:
        self._span.set_attribute(key, value)

    def record_error(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        from .redaction import error_text, traceback_text

        # Redacted: a database error's parameters and row details stay out of traces.
        message = error_text(exc)
        self._span.record_exception(
            exc,
            attributes={
                "exception.message": message,
                "exception.stacktrace": traceback_text(exc),
            },
        )
        self._span.set_attribute("error.type", _error_type(exc))
        self._span.set_status(Status(StatusCode.ERROR, message[:1000]))

    def trace_headers(self) -> dict[str, str]:
        return _headers_of(self._span.get_span_context())


class OpenTelemetryInstrumentation(Instrumentation):
    """outboxer's hooks implemented with the OpenTelemetry API."""

    enabled = True

    def __init__(
        self,
        *,
        producer_system: str | None = None,
        attribute_headers: Iterable[str] = (),
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        from opentelemetry import metrics, trace

        from . import __version__

        self.producer_system = producer_system or os.environ.get(
            "OUTBOXER_MESSAGING_SYSTEM", "outboxer"
        )
        """``messaging.system`` of ``create`` spans: the broker is not known at publish time."""
        self.attribute_headers = tuple(attribute_headers)
        self.tracer: Tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        self._sent = meter.create_counter(
            "messaging.client.sent.messages",
            unit="{message}",
            description="Messages the relay tried to send, by outcome (error.type when failed).",
        )
        self._batch_duration = meter.create_histogram(
            "outboxer.relay.batch.duration",
            unit="s",
            description="Claim, send and settle of one batch.",
        )
        self._handler_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="One handler run, with its inbox row.",
        )
        self._duplicates = meter.create_counter(
            "outboxer.inbox.duplicates",
            unit="{message}",
            description="Deliveries the inbox skipped.",
        )
        self._observers: list[Callable[[], Mapping[str, Any]]] = []
        meter.create_observable_gauge(
            "outboxer.outbox.backlog",
            callbacks=[self._observe("pending")],
            unit="{message}",
            description="Outbox rows not yet sent.",
        )
        meter.create_observable_gauge(
            "outboxer.outbox.oldest_pending_age",
            callbacks=[self._observe("oldest_due_seconds")],
            unit="s",
            description="How long the oldest due outbox row has waited.",
        )
        meter.create_observable_gauge(
            "outboxer.dead_letters",
            callbacks=[self._observe("dead_letters")],
            unit="{message}",
            description="Dead letters waiting for a decision.",
        )

    # Spans ----------------------------------------------------------------------------

    def create(self, envelope: Envelope) -> dict[str, str]:
        from opentelemetry.trace import SpanKind

        span = self.tracer.start_span(
            f"create {envelope.destination}",
            kind=SpanKind.PRODUCER,
            attributes=_sampling_attributes(envelope, "create", self.producer_system),
        )
        if span.is_recording():
            span.set_attributes(self._message_attributes(envelope))
        span.end()
        return _headers_of(span.get_span_context())

    @contextlib.contextmanager
    def send(
        self, transport: TransportDescription, destination: str, envelopes: Sequence[Envelope]
    ) -> Iterator[SpanHandle]:
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {
            "messaging.system": transport.system,
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": destination,
            **transport.attributes,
        }
        types = {e.type for e in envelopes}
        routing_key = next(iter(types)) if len(types) == 1 else None
        attributes.update(transport.destination_attributes(destination, routing_key))
        if len(envelopes) == 1:
            attributes["messaging.message.id"] = str(envelopes[0].message_id)
        else:
            attributes["messaging.batch.message_count"] = len(envelopes)
        links = [link for e in envelopes if (link := _link(e.traceparent, e.tracestate))]
        # Not made current: the relay keeps two sends in flight and ends them out of order,
        # and a send span has no children.
        span = self.tracer.start_span(
            f"send {destination}",
            context=_context_of(None, None),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            links=links,
        )
        try:
            yield _Span(span)
        finally:
            span.end()

    @contextlib.contextmanager
    def process(
        self, transport: TransportDescription, envelope: Envelope, consumer: str
    ) -> Iterator[SpanHandle]:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        ambient = trace.get_current_span().get_span_context()
        links = [trace.Link(ambient)] if ambient.is_valid else []
        with self.tracer.start_as_current_span(
            f"process {envelope.destination}",
            context=_context_of(envelope.traceparent, envelope.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=_sampling_attributes(envelope, "process", transport.system),
            links=links,
        ) as span:
            if span.is_recording():
                span.set_attributes(self._message_attributes(envelope))
                span.set_attribute("messaging.consumer.group.name", consumer)
                span.set_attributes(dict(transport.attributes))
            yield _Span(span)

    @contextlib.contextmanager
    def handler(self, envelope: Envelope, handler: str, attempt: int) -> Iterator[SpanHandle]:
        with self.tracer.start_as_current_span(
            f"handle {handler}",
            attributes={
                "outboxer.handler": handler,
                "outboxer.handler.attempt": attempt,
                "messaging.message.id": str(envelope.message_id),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield _Span(span)

    @contextlib.contextmanager
    def step(
        self, name: str, envelope: Envelope | None, attributes: Mapping[str, Any] | None = None
    ) -> Iterator[SpanHandle]:
        from opentelemetry import trace

        attributes = dict(attributes or {})
        target = attributes.get("outboxer.handler") or (envelope.destination if envelope else "")
        context = None
        if envelope is not None and not trace.get_current_span().get_span_context().is_valid:
            # No span is current (the relay): continue the message's own trace.
            context = _context_of(envelope.traceparent, envelope.tracestate)
        if envelope is not None:
            attributes.setdefault("messaging.message.id", str(envelope.message_id))
        with self.tracer.start_as_current_span(
            f"{name} {target}".strip(), context=context, attributes=attributes
        ) as span:
            yield _Span(span)

    @contextlib.contextmanager
    def replay(
        self, trace_headers: Mapping[str, str], attributes: Mapping[str, Any]
    ) -> Iterator[SpanHandle]:
        from opentelemetry import trace

        ambient = trace.get_current_span().get_span_context()
        links = [trace.Link(ambient)] if ambient.is_valid else []
        target = attributes.get("outboxer.handler") or attributes.get("outboxer.dead_letter.origin")
        with self.tracer.start_as_current_span(
            f"replay {target}",
            context=_context_of(trace_headers.get("traceparent"), trace_headers.get("tracestate")),
            attributes=dict(attributes),
            links=links,
        ) as span:
            yield _Span(span)

    def _message_attributes(self, envelope: Envelope) -> dict[str, Any]:
        """Per-message attributes, set only on recording spans (they cost a dict per span)."""
        attributes: dict[str, Any] = {
            "messaging.message.id": str(envelope.message_id),
            "messaging.message.conversation_id": envelope.correlation,
            "messaging.message.body.size": len(envelope.payload),
            "outboxer.message.type": envelope.type,
        }
        for name in self.attribute_headers:
            value = envelope.headers.get(name)
            if value is not None:
                attributes[f"outboxer.header.{name}"] = value
        return attributes

    # Metrics ----------------------------------------------------------------------------

    def relay_batch(self, *, sent: int, retried: int, dead_lettered: int, duration: float) -> None:
        if sent:
            self._sent.add(sent, {"messaging.operation.name": "send"})
        if retried:
            self._sent.add(retried, {"messaging.operation.name": "send", "error.type": "retry"})
        if dead_lettered:
            self._sent.add(
                dead_lettered, {"messaging.operation.name": "send", "error.type": "dead_letter"}
            )
        self._batch_duration.record(duration)

    def handler_done(self, handler: str, outcome: str, duration: float) -> None:
        if outcome == "duplicate":
            self._duplicates.add(1, {"outboxer.handler": handler})
        self._handler_duration.record(
            duration, {"outboxer.handler": handler, "outboxer.handler.outcome": outcome}
        )

    def observe_outbox(self, callback: Any) -> None:
        self._observers.append(callback)

    def _observe(self, figure: str) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation

        def observe(options: Any) -> Iterable[Any]:
            for callback in list(self._observers):
                try:
                    figures = callback()
                except Exception:  # the database may be down; report nothing this time
                    log.debug("reading outbox figures failed", exc_info=True)
                    continue
                value = figures.get(figure)
                if isinstance(value, Mapping):
                    for key, count in value.items():
                        yield Observation(count, {"outboxer.dead_letter.origin": key})
                elif value is not None:
                    yield Observation(value)

        return observe


def _sampling_attributes(envelope: Envelope, operation: str, system: str) -> dict[str, Any]:
    """What semantic conventions ask for at span creation, where samplers can see it."""
    return {
        "messaging.system": system,
        "messaging.operation.name": operation,
        "messaging.operation.type": operation,
        "messaging.destination.name": envelope.destination,
    }


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
