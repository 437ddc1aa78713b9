"""OpenTelemetry tracing and metrics for outboxer: one trace per message journey.

Installed automatically when ``opentelemetry-api`` is importable (the ``otel`` extra);
without it every hook is a no-op. Spans follow the messaging semantic conventions:

* ``create {destination}`` (PRODUCER) at ``publish()``, a child of the caller's span;
  its context is stored with the message (``traceparent``/``tracestate``);
* ``send {destination}`` (CLIENT) per relay batch and destination, linking to every
  message's creation context (the relay has no parent of its own);
* ``process {destination}`` (CONSUMER) per delivered message, **parented to the
  creation context** so the journey is one trace in Jaeger, with a link to whatever span
  was current in the consumer;
* ``handle {consumer:handler}`` (INTERNAL) per handler run, with
  ``outboxer.handler.outcome`` = processed, duplicate, failed...;
* ``retry ...``, ``dead_letter ...`` and ``replay ...`` (INTERNAL): a retry message
  carries the retry span's context, so the next delivery continues the trace; a dead
  letter stores its span's context, and a replay continues from it (linking the
  operator's span, if any).

No header or payload value becomes a span attribute unless ``attribute_headers`` names it.
The ``outboxer relay`` and ``outboxer-inbox`` commands configure the SDK from the
standard ``OTEL_*`` variables (:func:`configure_from_env`).

This module installs and configures the hooks. The parts, one idea each:
:mod:`outboxer.telemetry` (the hooks: spans and metrics) and :mod:`outboxer.tracecontext`
(W3C trace context to and from OpenTelemetry).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from . import instrumentation
from .instrumentation import Instrumentation
from .redaction import one_line
from .telemetry import OpenTelemetryInstrumentation

__all__ = ["OpenTelemetryInstrumentation", "configure_from_env", "install", "uninstall"]

log = logging.getLogger("outboxer.tracing")

DEFAULT_LINK_LIMIT = 1024
"""Relay send spans link every message of a batch; the SDK's default keeps only 128."""


def install(**options: Any) -> Instrumentation:
    """Use OpenTelemetry for outboxer's spans and metrics; returns the previous hooks."""
    return instrumentation.install(OpenTelemetryInstrumentation(**options))


def uninstall() -> None:
    """Back to the no-op hooks."""
    instrumentation.install(Instrumentation())


def install_if_available() -> bool:
    """Install the OpenTelemetry hooks when the API is importable (``OUTBOXER_TRACING=off``
    opts out); called when outboxer is imported."""
    if os.environ.get("OUTBOXER_TRACING", "").lower() in ("0", "off", "false", "no"):
        return False
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    install()
    return True


def configure_from_env(service_name: str, metric_readers: Sequence[Any] = ()) -> Callable[[], None]:
    """Configure the OpenTelemetry SDK from ``OTEL_*`` variables, for the CLI processes.

    Traces (and metrics) are exported over OTLP when an OTLP endpoint is set
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``) or
    ``OTEL_TRACES_EXPORTER`` asks for ``otlp`` or ``console``. ``OTEL_SERVICE_NAME``
    defaults to ``service_name``. ``metric_readers`` (the Prometheus exporter of
    ``--metrics-port``) read the same metrics, whatever the variables say. Returns a
    function that flushes and shuts down.
    """
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or wanted == "none"
    export_traces = not disabled and (bool(endpoint) or wanted in ("otlp", "console"))
    if not export_traces and not metric_readers:
        return lambda: None
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning(
            "OTEL_* is set but the OpenTelemetry SDK is missing: pip install 'outboxer[otel]'"
        )
        return lambda: None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    shutdowns: list[Callable[[], Any]] = []
    if export_traces:
        link_limit = None if os.environ.get("OTEL_SPAN_LINK_COUNT_LIMIT") else DEFAULT_LINK_LIMIT
        provider = TracerProvider(resource=resource, span_limits=SpanLimits(max_links=link_limit))
        exporter: Any
        if wanted == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        shutdowns.append(provider.shutdown)
    readers = list(metric_readers)
    otlp_metrics = os.environ.get("OTEL_METRICS_EXPORTER", "otlp").lower() == "otlp"
    if export_traces and otlp_metrics and endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        shutdowns.append(meter_provider.shutdown)
    previous = install()  # re-bind tracers and meters to the providers just set
    current = instrumentation.get()
    if isinstance(previous, OpenTelemetryInstrumentation) and isinstance(
        current, OpenTelemetryInstrumentation
    ):
        # The gauges created at import (through the API's proxy meter) became the SDK's,
        # and the SDK keeps their callbacks for these names: they must see the figures
        # registered from now on.
        current._observers = previous._observers
    log.info("OpenTelemetry configured for service %s", resource.attributes["service.name"])

    def shutdown() -> None:
        for stop in shutdowns:
            try:
                stop()
            except Exception as exc:  # an exporter that cannot flush: one line
                log.warning("OpenTelemetry shutdown failed (%s)", one_line(exc))
                log.debug("OpenTelemetry shutdown failed", exc_info=True)

    return shutdown
