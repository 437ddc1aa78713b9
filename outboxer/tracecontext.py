"""W3C trace context to and from OpenTelemetry: the ``traceparent``/``tracestate``
headers a message carries, and the span contexts, links and parent contexts made of them.

Part of :mod:`outboxer.tracing`; used by :mod:`outboxer.telemetry`.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .wire import traceparent_fields

if TYPE_CHECKING:
    from opentelemetry.trace import Link, SpanContext


@cache
def _trace_api() -> ModuleType:
    """``opentelemetry.trace``, imported on first use (the ``otel`` extra is optional) and
    then looked up once: the relay makes a link per message, a thousand per batch, and an
    import statement per call cost a fifth of each."""
    from opentelemetry import trace

    return trace


def _headers_of(context: SpanContext) -> dict[str, str]:
    if not context.is_valid:
        return {}
    ids = f"{context.trace_id:032x}-{context.span_id:016x}"
    headers = {"traceparent": f"00-{ids}-{context.trace_flags:02x}"}
    state = context.trace_state.to_header() if context.trace_state else ""
    if state:
        headers["tracestate"] = state
    return headers


def _span_context(traceparent: str | None, tracestate: str | None) -> SpanContext | None:
    """The remote span context of a W3C traceparent; None when it is absent or invalid.

    Invalid by the W3C rules (see :func:`outboxer.wire.traceparent_fields`) means the
    sender does not choose the trace or its sampling: the message starts a new trace.
    """
    if not traceparent:
        return None
    fields = traceparent_fields(traceparent)
    if fields is None:
        return None
    trace_id, span_id, flags = fields
    trace = _trace_api()
    state = None
    if tracestate:
        try:
            state = trace.TraceState.from_header([tracestate])
        except Exception:  # a malformed tracestate is dropped, the parent kept (W3C)
            state = None
    return trace.SpanContext(  # type: ignore[no-any-return]
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(flags & 0xFF),
        trace_state=state,
    )


def _link(traceparent: str | None, tracestate: str | None) -> Link | None:
    context = _span_context(traceparent, tracestate)
    return None if context is None else _trace_api().Link(context)


def _context_of(traceparent: str | None, tracestate: str | None) -> Any:
    from opentelemetry import context as otel_context

    span_context = _span_context(traceparent, tracestate)
    if span_context is None:
        # No creation context: start a fresh trace rather than nest under the ambient span.
        return otel_context.Context()
    trace = _trace_api()
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context), otel_context.Context())
