"""Scheduled handlers: a changed ``every``, names the schedule table can hold, and one slow
handler beside the others."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.runner import StopSignal
from outboxer.scheduling import Scheduler
from outboxer.store import schedule as schedule_store
from outboxer.tables import schedules
from outboxer.testing import MemoryTransport

SessionFactory = sessionmaker[outboxer.OutboxSession]


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def claim(engine: Engine, every: float, owner: str = "a") -> int | None:
    """Claim the current tick of ``every``, then give the lease back at once."""
    with engine.connect() as connection:
        tick = schedule_store.claim_tick(
            connection, name="reports:stats", every=every, owner=owner, lease=60
        )
        schedule_store.release_tick(connection, name="reports:stats", owner=owner)
    return tick


# 1. every changes between deploys -------------------------------------------------------


def test_a_schedule_whose_every_grows_runs_again_at_its_next_tick(engine: Engine) -> None:
    with engine.connect() as connection:
        schedule_store.ensure_schedule(connection, "reports:stats")
    assert claim(engine, every=1) is not None  # deploy 1: every second
    # Deploy 2: every 2 s. Its tick numbers are half those of deploy 1's, yet its next
    # tick (at most 2 s away) runs, once.
    ticks: list[int | None] = []
    assert wait_until(lambda: ticks.append(claim(engine, every=2)) or ticks[-1] is not None, 6)
    again = claim(engine, every=2)
    assert again is None or again > ticks[-1]  # type: ignore[operator]


def test_a_schedule_whose_every_shrinks_runs_at_its_next_tick(engine: Engine) -> None:
    with engine.connect() as connection:
        schedule_store.ensure_schedule(connection, "reports:stats")
    assert claim(engine, every=2) is not None
    assert wait_until(lambda: claim(engine, every=1) is not None, timeout=4)


def test_one_tick_still_runs_once_across_replicas(engine: Engine) -> None:
    with engine.connect() as connection:
        schedule_store.ensure_schedule(connection, "reports:stats")
    year = timedelta(days=365).total_seconds()
    assert claim(engine, every=year, owner="a") is not None
    assert claim(engine, every=year, owner="b") is None
    assert claim(engine, every=year, owner="a") is None


def old_claim(engine: Engine, every: float) -> int | None:
    """The claim of an outboxer before 2026-11-30 (a96f996), by tick number: the tick it
    claimed, or None."""
    with engine.begin() as connection:
        current = schedule_store.read_db_now(connection)
        tick = math.floor(current.timestamp() / every)
        claimed = connection.execute(
            update(schedules)
            .where(schedules.c.name == "reports:stats", schedules.c.last_tick < tick)
            .values(last_tick=tick, ran_at=current)
        )
    return tick if claimed.rowcount == 1 else None


def test_replicas_of_this_and_the_older_outboxer_run_each_tick_once(engine: Engine) -> None:
    """A rolling deploy (or a rollback) runs both versions side by side. Found attacking the
    first fix, which stored due times in ``last_tick``: the tick ran on both versions, and
    the older replicas never ran again (tick numbers stayed below the stored times)."""
    with engine.connect() as connection:
        schedule_store.ensure_schedule(connection, "reports:stats")
    year = timedelta(days=365).total_seconds()
    assert old_claim(engine, every=year) is not None
    assert claim(engine, every=year) is None  # the older replica ran this tick
    every = 2.0
    ran: list[int | None] = []
    assert wait_until(lambda: ran.append(claim(engine, every=every)) or ran[-1] is not None, 5)
    older = old_claim(engine, every=every)
    assert older is None or older > ran[-1]  # type: ignore[operator]
    # The older replica still runs the next ticks, and this one does not run them too.
    old_ran: list[int | None] = []
    assert wait_until(
        lambda: old_ran.append(old_claim(engine, every=every)) or old_ran[-1] is not None, 5
    )
    again = claim(engine, every=every)
    assert again is None or again > old_ran[-1]  # type: ignore[operator]


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_consumer_redeployed_with_a_longer_every_keeps_running(Session: SessionFactory) -> None:
    runs: list[float] = []

    def deploy(every: float) -> None:
        consumer = outboxer.Consumer(Session, name="reports")

        @consumer.scheduled(every=every)
        def stats() -> None:
            runs.append(every)

        consumer.run(MemoryTransport(), once=True)

    deploy(1)
    assert runs == [1]
    assert wait_until(lambda: deploy(2) or runs.count(2) >= 1, timeout=6, step=0.2)


# 2. names the schedule table can hold ------------------------------------------------------


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_name_longer_than_the_schedule_column_is_refused_at_registration(
    Session: SessionFactory,
) -> None:
    consumer = outboxer.Consumer(Session, name="reports-" + "x" * 100)
    with pytest.raises(outboxer.ConfigurationError, match=r"255 characters.*name="):
        consumer.scheduled(every=1, name="nightly_" + "y" * 150)(lambda: None)
    assert consumer.schedules == []
    longest = 255 - len(consumer.name) - 1
    with pytest.raises(outboxer.ConfigurationError, match="255 characters"):
        consumer.scheduled(every=1, name="n" * (longest + 1))(lambda: None)
    consumer.scheduled(every=1, name="n" * longest)(lambda: None)


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_the_longest_name_accepted_runs_on_the_database(
    engine: Engine, Session: SessionFactory
) -> None:
    consumer = outboxer.Consumer(Session, name="reports-" + "x" * 100)
    runs: list[int] = []
    name = "n" * (255 - len(consumer.name) - 1)
    consumer.scheduled(every=timedelta(days=365), name=name)(lambda: runs.append(1))
    consumer.run(MemoryTransport(), once=True)
    assert runs == [1]
    with engine.connect() as connection:
        assert connection.execute(select(schedules.c.name)).scalars().all() == [
            f"{consumer.name}:{name}"
        ]


# 3. a slow handler beside the others ----------------------------------------------------------


@contextmanager
def scheduler_running(scheduler: Scheduler, release: threading.Event) -> Iterator[StopSignal]:
    """Run ``scheduler.keep_running`` in a thread; on exit, set ``release`` (what the
    handlers wait for), stop it and check that it ended."""
    stop = StopSignal()
    ended = threading.Event()

    def run() -> None:
        try:
            asyncio.run(scheduler.keep_running(stop))
        finally:
            ended.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        release.set()
        stop.set()
        assert ended.wait(20), "the scheduler did not stop"
        thread.join(5)


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"], indirect=True)
def test_a_slow_scheduled_handler_does_not_delay_the_others(Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    slow_running, release = threading.Event(), threading.Event()
    fast_runs: list[int] = []
    active = {"fast": 0, "most": 0}
    lock = threading.Lock()

    @consumer.scheduled(every=timedelta(days=365))
    def slow() -> None:
        slow_running.set()
        release.wait(30)

    @consumer.scheduled(every=0.2)
    def fast(context: outboxer.Tick) -> None:
        with lock:
            active["fast"] += 1
            active["most"] = max(active["most"], active["fast"])
        time.sleep(0.05)
        with lock:
            active["fast"] -= 1
        fast_runs.append(context.number)

    with scheduler_running(Scheduler(consumer.schedules, Session), release):
        assert slow_running.wait(20)
        assert wait_until(lambda: len(fast_runs) >= 4, timeout=10), fast_runs
    assert active["most"] == 1  # a handler's runs never overlap
    assert len(set(fast_runs)) == len(fast_runs)  # one run per tick


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_stopping_waits_for_the_runs_in_progress(Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    running, release, finished = threading.Event(), threading.Event(), threading.Event()

    @consumer.scheduled(every=timedelta(days=365))
    def slow() -> None:
        running.set()
        release.wait(30)
        finished.set()

    stop = StopSignal()
    ended = threading.Event()
    thread = threading.Thread(
        target=lambda: (
            asyncio.run(Scheduler(consumer.schedules, Session).keep_running(stop)),
            ended.set(),
        ),
        daemon=True,
    )
    thread.start()
    try:
        assert running.wait(20)
        stop.set()
        assert not ended.wait(0.5)  # the run in progress finishes first
    finally:
        release.set()
    assert ended.wait(20) and finished.is_set()
    thread.join(5)


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_once_runs_every_due_handler_and_returns(Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="reports")
    runs: list[str] = []
    for name in ("a", "b", "c"):
        consumer.scheduled(every=timedelta(days=365), name=name)(
            lambda name=name: runs.append(name)
        )
    asyncio.run(Scheduler(consumer.schedules, Session).keep_running(StopSignal(), once=True))
    assert sorted(runs) == ["a", "b", "c"]
