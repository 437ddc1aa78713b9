"""Relay throughput with tracing on over tracing off, same run (target >= 0.9x).

Tracing on: the OpenTelemetry SDK with a batch span processor (spans are built, linked
and exported to an exporter that drops them, so the network is not measured) and an SDK
meter provider. Tracing off: outboxer's no-op hooks. Both relay the same rows, which
carry trace context from the publishing side, to RabbitMQ.

Besides the throughput ratio (the target), each round reads the CPU time of this process
(the relay's threads, pika's, the span processor's) over the same relay run: what tracing
costs the relay itself, which the wall-time ratio mixes with whatever else the shared
machine did during the round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from outboxer import instrumentation
from outboxer.tracing import OpenTelemetryInstrumentation

from .common import Figure, median
from .relay import publish_rows, relay_to_rabbitmq


def _instrumentations() -> tuple[instrumentation.Instrumentation, instrumentation.Instrumentation]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider(span_limits=SpanLimits(max_links=1024))
    tracer_provider.add_span_processor(BatchSpanProcessor(Dropping()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    on = OpenTelemetryInstrumentation(
        tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    return on, instrumentation.Instrumentation()


def run(rounds: int = 7, messages: int = 20_000) -> list[Figure]:
    on, off = _instrumentations()
    previous = instrumentation.get()
    ratios, on_rates, off_rates, cpu_ratios = [], [], [], []
    with relay_to_rabbitmq() as rig:
        Session, rabbit, relay = rig.Session, rig.rabbit, rig.relay
        try:
            instrumentation.install(on)  # rows carry a creation context, as in service
            publish_rows(Session, rabbit.exchange, 1000)
            relay.run(once=True)
            for i in range(rounds):
                rates, cpu = {}, {}
                for label, hooks in (
                    (("on", on), ("off", off)) if i % 2 else (("off", off), ("on", on))
                ):
                    instrumentation.install(on)
                    publish_rows(Session, rabbit.exchange, messages)
                    instrumentation.install(hooks)
                    rabbit.purge()
                    started, cpu_started = time.perf_counter(), time.process_time()
                    stats = relay.run(once=True)
                    assert stats.sent == messages, stats
                    rates[label] = messages / (time.perf_counter() - started)
                    cpu[label] = time.process_time() - cpu_started
                on_rates.append(rates["on"])
                off_rates.append(rates["off"])
                ratios.append(rates["on"] / rates["off"])
                cpu_ratios.append(cpu["on"] / cpu["off"])
        finally:
            instrumentation.install(previous)
    ratio = median(ratios)
    return [
        Figure(
            "relay with tracing on / off",
            ratio,
            "x",
            ">= 0.9x",
            ratio >= 0.9,
            f"{median(on_rates):,.0f} vs {median(off_rates):,.0f} msg/s (RabbitMQ, SDK with "
            f"batch processor), {rounds} rounds x {messages:,}",
            ratios,
        ),
        Figure(
            "relay process CPU per message, tracing on / off",
            median(cpu_ratios),
            "x",
            "",
            True,
            "CPU time of the relay's process over the same runs (all its threads)",
            cpu_ratios,
        ),
    ]
