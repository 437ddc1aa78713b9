"""Scheduled handlers: once per tick across replicas, instant retries, the error channel,
what they publish going through the outbox, and the refusals at registration."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.runner import StopSignal
from outboxer.scheduling import Scheduler

from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .models import Effect
from .relaying import OUTBOXER, output, spawn, stop, wait_for
from .services import RABBITMQ_URL, port_open, require

SessionFactory = sessionmaker[outboxer.OutboxSession]

YEARS = timedelta(days=3650)
"""A tick so long that two calls in a test fall in the same one."""


def outbox_types(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(outboxer.outbox.c.message_type)).scalars())


def test_two_replicas_run_a_tick_once_and_the_next_tick_again(
    engine: Engine, Session: SessionFactory
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    ticks: list[int] = []

    @consumer.scheduled(every=YEARS)
    def nightly(context: outboxer.Tick) -> None:
        ticks.append(context.number)

    now = [1_000.0]
    replicas = [Scheduler(consumer.schedules, Session, clock=lambda: now[0]) for _ in range(2)]
    for replica in replicas * 2:
        replica.run_due()
    assert len(ticks) == 1
    assert replicas[0].run_due() > 0  # seconds to the next tick
    # Another tick is due: move the last run back, as if a tick had passed.
    with engine.begin() as conn:
        conn.execute(
            outboxer.metadata.tables["outboxer_schedule"].update().values(last_tick=0, ran_at=None)
        )
    for replica in replicas:
        replica.run_due()
    assert len(ticks) == 2 and ticks[0] == ticks[1]


def test_a_run_longer_than_its_lease_renews_it_so_no_tick_starts_beside_it(
    Session: SessionFactory,
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    running, release = threading.Event(), threading.Event()
    starts: list[int] = []

    @consumer.scheduled(every=0.3, lease=0.6)
    def slow(context: outboxer.Tick) -> None:
        starts.append(context.number)
        running.set()
        release.wait(15)

    first, second = (Scheduler(consumer.schedules, Session) for _ in range(2))
    stop = StopSignal()
    thread = threading.Thread(target=lambda: asyncio.run(first.keep_running(stop)))
    thread.start()
    try:
        assert running.wait(30)
        # Several ticks and several lease lengths go by while the first run lasts.
        watch_until = time.monotonic() + 2.5
        while time.monotonic() < watch_until:
            second.run_due()
            time.sleep(0.1)
        assert len(starts) == 1
    finally:
        release.set()
        stop.set()
        thread.join(30)
    second.run_due()  # the lease is given back with the run: the current tick goes
    assert len(starts) >= 2


def test_a_scheduled_run_publishes_through_the_outbox_with_its_commit(
    engine: Engine, Session: SessionFactory
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")

    @consumer.scheduled(every=YEARS)
    def report(session: Session, context: outboxer.Tick) -> None:
        session.add(Effect(handler="report", message_key=str(context.number)))
        session.publish({"tick": context.number}, type="reports.ready", destination="reports")

    Scheduler(consumer.schedules, Session).run_due()
    assert outbox_types(engine) == ["reports.ready"]
    with engine.connect() as conn:
        assert conn.execute(select(Effect.handler)).scalars().all() == ["report"]


def test_a_failing_tick_is_retried_at_once_then_goes_to_its_error_channel(
    engine: Engine, Session: SessionFactory
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    attempts: list[int] = []
    failures: list[outboxer.Failure] = []

    def alert(failure: outboxer.Failure, session: outboxer.OutboxSession) -> None:
        failures.append(failure)
        session.publish({"handler": failure.handler}, type="ops.alert", destination="ops")

    @consumer.scheduled(every=YEARS, retry=outboxer.Retry(max_attempts=3, instant=2))
    def flaky(session: outboxer.OutboxSession, context: outboxer.Tick) -> None:
        attempts.append(context.attempt)
        session.publish({"n": context.attempt}, type="reports.ready", destination="reports")
        raise ConnectionError("the warehouse is down")

    assert consumer.schedules[0].channel is None  # no error channel: logged only

    @consumer.scheduled(
        every=YEARS,
        name="flaky_alerting",
        retry=outboxer.Retry(max_attempts=3, instant=2),
        on_failure=alert,
    )
    def flaky_alerting(session: outboxer.OutboxSession, context: outboxer.Tick) -> None:
        flaky(session, context)

    Scheduler(consumer.schedules, Session).run_due()
    assert attempts == [1, 2, 3, 1, 2, 3]
    [failure] = failures
    assert (failure.handler, failure.attempts, failure.reason) == ("flaky_alerting", 3, "exhausted")
    assert isinstance(failure.error, ConnectionError)
    assert isinstance(failure.event, outboxer.Tick)
    assert outbox_types(engine) == ["ops.alert"]  # the failed runs' messages rolled back
    assert outboxer.DeadLetters(Session).list() == []  # no message to dead-letter


def test_the_consumers_error_channel_serves_its_scheduled_handlers(Session: SessionFactory) -> None:
    seen: list[str] = []
    consumer = outboxer.Consumer(
        Session, name="reports", on_failure=lambda failure: seen.append(failure.handler)
    )

    @consumer.scheduled(every=YEARS)
    def broken() -> None:
        raise ValueError("no")

    Scheduler(consumer.schedules, Session).run_due()
    assert seen == ["broken"]


def test_the_process_wide_default_error_channel_serves_scheduled_handlers_last(
    Session: SessionFactory,
) -> None:
    seen: list[str] = []
    consumer = outboxer.Consumer(Session, name="reports")

    @consumer.scheduled(every=YEARS)
    def broken() -> None:
        raise ValueError("no")

    outboxer.set_default_on_failure(lambda failure: seen.append(failure.handler))
    try:
        Scheduler(consumer.schedules, Session).run_due()
    finally:
        outboxer.set_default_on_failure(None)
    assert seen == ["broken"]


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_impossible_scheduled_handlers_are_refused_at_registration(
    Session: SessionFactory,
) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    with pytest.raises(outboxer.ConfigurationError, match=r"delayed retries.*instant=2\)"):
        consumer.scheduled(every=60, retry=outboxer.Retry(max_attempts=3))(lambda: None)
    with pytest.raises(outboxer.ConfigurationError, match="more than 0 seconds"):
        consumer.scheduled(every=timedelta(0))(lambda: None)
    with pytest.raises(outboxer.ConfigurationError, match="timedelta or seconds"):
        consumer.scheduled(every="1m")(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(outboxer.ConfigurationError, match="parameter 'event'"):
        consumer.scheduled(every=60)(lambda event: None)
    with pytest.raises(outboxer.ConfigurationError, match="no error channel named 'pager'"):
        consumer.scheduled(every=60, on_failure="pager")(lambda: None)

    async def later() -> None:
        pass

    with pytest.raises(outboxer.ConfigurationError, match="not async def"):
        consumer.scheduled(every=60)(later)
    consumer.scheduled(every=60, name="twice")(lambda: None)
    with pytest.raises(outboxer.ConfigurationError, match="name is taken"):
        consumer.scheduled(every=60, name="twice")(lambda: None)
    async_consumer = outboxer.Consumer(
        async_sessionmaker(class_=outboxer.AsyncOutboxSession), name="async"
    )
    with pytest.raises(outboxer.ConfigurationError, match="sync session factory"):
        async_consumer.scheduled(every=60)(lambda: None)


# Two outboxer-inbox processes, one PostgreSQL, RabbitMQ --------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_scheduled_handler_runs_once_per_tick_with_two_outboxer_inbox_processes(
    engine: Engine, db_url: str
) -> None:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
    case = RabbitMQCase()
    name = case.unique("ticker")
    destination = case.new_destination()
    case.queues.append(name)
    case.exchanges.append(name)
    env = {
        **os.environ,
        "APP_DB": db_url,
        "APP_DESTINATION": destination,
        "APP_CONSUMER": name,
        "OUTBOXER_BROKER": RABBITMQ_URL,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    command = [str(Path(OUTBOXER).parent / "outboxer-inbox"), "tests.scheduled_app:consumer"]
    workers = [spawn(command, env=env) for _ in range(2)]

    def ticks() -> Counter[str]:
        with engine.connect() as conn:
            rows = conn.execute(select(Effect.message_key).where(Effect.handler == "tick"))
            return Counter(rows.scalars())

    try:
        # Both running before either is stopped (a SIGTERM while importing kills a process).
        wait_for(
            lambda: all(" started" in output(worker) for worker in workers), 120, "both to start"
        )
        first = len(ticks())
        wait_for(lambda: len(ticks()) >= first + 5, 120, "five ticks with both running")
    finally:
        logs = [stop(worker) for worker in workers]
        case.close()
    per_tick = ticks()
    assert set(per_tick.values()) == {1}, per_tick
    published: Any = Counter(outbox_types(engine))
    assert published["test.order_placed"] == sum(per_tick.values())
    print(f"\n{len(per_tick)} ticks, each run once by one of two processes")
    for log in logs:
        assert "Traceback" not in log, log[-3000:]
