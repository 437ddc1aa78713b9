"""Scheduled handlers in traces, metrics and ``drain``, as message handlers are.

Before (2026-11-30): a scheduled run went through no instrumentation at all. A tick that
failed, retried and gave up showed nothing in Jaeger and no ``messaging.process.duration``
point, and ``drain`` (fail_fast) passed over a failing tick.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.trace import StatusCode
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.scheduling import Scheduler
from outboxer.testing import MemoryBroker, MemoryTransport

from .test_tracing import Otel, otel  # noqa: F401 - the fixture

SessionFactory = sessionmaker[outboxer.OutboxSession]
YEARS = timedelta(days=3650)


class Flaky(Exception):
    pass


def test_each_run_of_a_tick_is_a_handler_span_with_its_outcome_and_duration(
    Session: SessionFactory,
    otel: Otel,  # noqa: F811 - the fixture
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    runs: list[int] = []

    @consumer.scheduled(every=YEARS, retry=outboxer.Retry(max_attempts=2, instant=1))
    def nightly(context: outboxer.Tick) -> None:
        runs.append(context.attempt)
        if context.attempt == 1:
            raise Flaky("the first run fails")

    Scheduler(consumer.schedules, Session).run_due()
    assert runs == [1, 2]
    spans = [s for s in otel.spans() if s.name == "handle reports:nightly"]
    assert [s.attributes["outboxer.handler.attempt"] for s in spans] == [1, 2]  # type: ignore[index]
    first, second = spans
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["error.type"] == f"{__name__}.Flaky"  # type: ignore[index]
    assert first.attributes["outboxer.handler.outcome"] == "failed"  # type: ignore[index]
    assert second.status.status_code is not StatusCode.ERROR
    assert second.attributes["outboxer.handler.outcome"] == "processed"  # type: ignore[index]
    assert second.attributes["outboxer.scheduled.tick"] > 0  # type: ignore[index, operator]
    outcomes = {
        point.attributes["outboxer.handler.outcome"]
        for point in otel.metric_points()["messaging.process.duration"]
        if point.attributes["outboxer.handler"] == "reports:nightly"
    }
    assert outcomes == {"failed", "processed"}


def test_a_tick_that_gives_up_ends_its_span_with_the_error_channels_work_inside(
    Session: SessionFactory,
    otel: Otel,  # noqa: F811 - the fixture
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    seen: list[Any] = []

    def channel(failure: outboxer.Failure, session: Any) -> None:
        seen.append(failure.envelope.type)

    @consumer.scheduled(every=YEARS, retry=outboxer.Retry(max_attempts=1), on_failure=channel)
    def nightly() -> None:
        raise Flaky("always")

    Scheduler(consumer.schedules, Session).run_due()
    assert seen == ["outboxer.scheduled"]
    (span,) = [s for s in otel.spans() if s.name == "handle reports:nightly"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["outboxer.handler.outcome"] == "error_channel"  # type: ignore[index]


def test_drain_raises_what_a_scheduled_handler_raised(
    engine: Engine, Session: SessionFactory
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")

    @consumer.scheduled(every=YEARS, retry=outboxer.Retry(max_attempts=1))
    def nightly() -> None:
        raise Flaky("the nightly report failed")

    with pytest.raises(outboxer.testing.HandlerFailed, match="reports:nightly raised Flaky"):
        outboxer.testing.drain(engine, [consumer], MemoryTransport(MemoryBroker()))
