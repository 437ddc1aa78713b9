"""Durations have a ceiling, and the operator's small mistakes get the right one line.

A review found settings in seconds accepted up to any size (``Backoff(1e13, ...)``,
``--lease 1e13``, ``Relay(retention=inf)``, ``@consumer.scheduled(every=1e-12)``,
``Retry(max_delay=inf)``): the date arithmetic they fed overflowed later, showing up as
endless "database trouble" or "the schedule could not be read" warnings, a failed send
re-sent every second without ever counting an attempt, a handler dead-lettered after half
its attempts. Every duration is now refused past 100 years (``outboxer.checks.MAX_DURATION``)
at configuration time, and the database clock never overflows whatever it is given.
It also found ``outboxer-inbox mod:missing`` reported as "is NoneType", and a broker URL
with a pasted space refused as a bad password.
"""

from __future__ import annotations

import math
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.cli.inbox import main as inbox_main
from outboxer.errors import ConfigurationError, RetryConfigError
from outboxer.scheduling import Scheduler
from outboxer.store.clock import db_now_plus, read_db_now
from outboxer.testing import MemoryBroker, MemoryTransport

from .cli_apps import closed_port, inbox_once, logapp_env
from .models import OrderPlaced
from .test_cli_failures import as_process, one_error_line, outboxer_cli

SessionFactory = sessionmaker[outboxer.OutboxSession]

LIMIT = 36500 * 86400.0
"""100 years in seconds."""


def test_the_limit_is_one_shared_constant() -> None:
    from outboxer import checks
    from outboxer.cli import common

    assert checks.MAX_DURATION == LIMIT
    assert common.MAX_DURATION is checks.MAX_DURATION


# Python API: refused at construction, naming the parameter and the limit ----------------


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ((1e13, 2.0, 1e13, 0.0), "initial"),
        ((1.0, 2.0, 1e13, 0.0), "max_delay"),
        ((1.0, 2.0, math.inf, 0.0), "max_delay"),
        ((1.0, 2.0, math.nan, 0.0), "max_delay"),
        ((1.0, math.inf, 300.0, 0.0), "multiplier"),
        ((1.0, math.nan, 300.0, 0.0), "multiplier"),
    ],
)
def test_a_backoff_past_100_years_is_refused(arguments: tuple[float, ...], name: str) -> None:
    with pytest.raises(RetryConfigError) as refused:
        outboxer.Backoff(*arguments)
    assert name in str(refused.value)
    if not any(math.isnan(a) for a in arguments) and name != "multiplier":
        assert "100 years" in str(refused.value)


@pytest.mark.parametrize("max_delay", [math.inf, 1e13])
def test_a_retry_whose_max_delay_is_past_100_years_is_refused(max_delay: float) -> None:
    with pytest.raises(RetryConfigError, match=r"max_delay.*100 years"):
        outboxer.Retry(max_attempts=4, initial_delay=0.001, multiplier=1e300, max_delay=max_delay)


def test_a_huge_multiplier_is_capped_before_it_overflows() -> None:
    """``multiplier**attempts`` overflowed a float (OverflowError) before max_delay capped it."""
    retry = outboxer.Retry(
        max_attempts=10, initial_delay=0.001, multiplier=1e300, max_delay=300.0, jitter=0
    )
    for attempt in range(2, 10):
        decision = retry.decide(attempt, RuntimeError("boom"))
        assert decision.delay == 300.0
    backoff = outboxer.Backoff(1.0, 2.0, LIMIT, 0.5)
    assert backoff.delay(10**9) <= LIMIT
    assert backoff.delay(5000, random=lambda: 1.0) == LIMIT


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("retention", math.inf),
        ("retention", 1e13),
        ("lease", 1e13),
        ("poll_interval", 1e13),
        ("prune_interval", 1e13),
    ],
)
def test_relay_durations_past_100_years_are_refused(setting: str, value: float) -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(ConfigurationError) as refused:
        outboxer.Relay(engine, MemoryTransport(MemoryBroker()), **{setting: value})
    message = str(refused.value)
    assert setting in message
    if not math.isinf(value):
        assert "100 years" in message
    engine.dispose()


def test_consumer_durations_past_100_years_are_refused() -> None:
    Session = sessionmaker(create_engine("sqlite://"), class_=outboxer.OutboxSession)
    with pytest.raises(ConfigurationError, match=r"inbox_retention.*100 years"):
        outboxer.Consumer(Session, name="c", inbox_retention=1e13)


@pytest.mark.parametrize(
    ("every", "lease", "problem"),
    [
        (1e-12, None, "every must be at least 0.001"),
        (0.0001, None, "every must be at least 0.001"),
        (1e13, None, "every.*100 years"),
        (timedelta.max, None, "every.*100 years"),
        (1.0, 1e13, "lease.*100 years"),
        (1.0, timedelta.max, "lease.*100 years"),
        (1.0, math.inf, "lease must be a timedelta or seconds"),
        # A lease far below a round trip would be renewed in a busy loop while a run lasts.
        (1.0, 1e-9, "lease must be at least 0.1 seconds"),
        (1.0, timedelta(microseconds=50_000), "lease must be at least 0.1 seconds"),
    ],
)
def test_a_schedule_out_of_bounds_is_refused_at_registration(
    every: float | timedelta, lease: float | timedelta | None, problem: str
) -> None:
    factory = sessionmaker(create_engine("sqlite://"), class_=outboxer.OutboxSession)
    consumer = outboxer.Consumer(factory, name="s1")
    with pytest.raises(ConfigurationError, match=problem):

        @consumer.scheduled(every=every, lease=lease)
        def tick() -> None:
            pass


# The limit itself is safe on every database ----------------------------------------------


def test_the_database_clock_never_overflows(engine: Engine) -> None:
    """A time past what a date holds is clamped to the limit, not an overflow that reads as
    'database trouble'."""
    with engine.connect() as connection:
        now = read_db_now(connection)
        for seconds in (1e13, 1e300, LIMIT):
            moment = connection.execute(select(db_now_plus(connection.dialect, seconds))).scalar()
            assert moment is not None
            assert moment - now <= timedelta(seconds=LIMIT + 60)
            assert moment - now >= timedelta(seconds=LIMIT - 60)


def test_a_failed_send_with_the_longest_backoff_is_settled(
    engine: Engine, Session: SessionFactory
) -> None:
    """Before: Backoff(1e13) overflowed the settle, the row was re-sent every second, its
    attempts stayed 0. At the limit it is settled: one attempt, due in 100 years."""
    broker = MemoryBroker(mandatory=True)  # no queue bound: the message is unroutable
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1))
    relay = outboxer.Relay(
        engine,
        MemoryTransport(broker),
        backoff=outboxer.Backoff(LIMIT, 2.0, LIMIT, 0.0),
        lease=LIMIT,
        retention=LIMIT,
    )
    stats = relay.run(once=True)
    assert stats.retried == 1
    with engine.connect() as connection:
        attempts, available_at = connection.execute(
            select(outboxer.outbox.c.attempts, outboxer.outbox.c.available_at)
        ).one()
        now = read_db_now(connection)
    assert attempts == 1
    assert available_at - now > timedelta(days=36000)


def test_a_schedule_with_the_longest_lease_runs(engine: Engine, Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="bounds")
    runs: list[int] = []

    @consumer.scheduled(every=LIMIT, lease=LIMIT)
    def yearly(context: outboxer.Tick) -> None:
        runs.append(context.number)

    scheduler = Scheduler(consumer.schedules, Session)
    scheduler.run_due()
    assert len(runs) == 1


# The command line -------------------------------------------------------------------------


@pytest.fixture
def relay_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    with sessionmaker(engine, class_=outboxer.OutboxSession).begin() as session:
        session.publish(OrderPlaced(order_id=1))
    engine.dispose()
    return url


def outbox_rows(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as connection:
        count = connection.execute(select(func.count()).select_from(outboxer.outbox)).scalar()
    engine.dispose()
    return int(count or 0)


@pytest.mark.parametrize(
    "option", ["--lease", "--retry-delay", "--max-retry-delay", "--retention", "--poll-interval"]
)
def test_relay_options_past_100_years_are_refused(relay_db: str, option: str) -> None:
    result = outboxer_cli(
        "relay",
        "--broker",
        "memory://bounds",
        "--once",
        option,
        "1e13",
        env={"OUTBOXER_DB": relay_db},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_error_line(result)
    assert option in line and "100 years" in line, line
    variable = "OUTBOXER_RELAY_" + option[2:].upper().replace("-", "_")
    result = outboxer_cli(
        "relay",
        "--broker",
        "memory://bounds",
        "--once",
        env={"OUTBOXER_DB": relay_db, variable: "1e13"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_error_line(result)
    assert variable in line and "100 years" in line, line
    assert outbox_rows(relay_db) == 1


def test_relay_options_at_100_years_are_taken(relay_db: str) -> None:
    arguments = ["--lease", str(LIMIT), "--retry-delay", str(LIMIT), "--retention", str(LIMIT)]
    result = outboxer_cli(
        "relay", "--broker", "memory://bounds-ok", "--once", "--max-retry-delay", str(LIMIT),
        *arguments, env={"OUTBOXER_DB": relay_db},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(MemoryBroker.named("bounds-ok").published) == 1


# One-line errors that name the real problem ----------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "boundsapp.py").write_text(
        "class holder:\n    consumer = 42\n\nnot_a_consumer = None\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("boundsapp", None)
    return tmp_path


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("boundsapp:missing", "module 'boundsapp' has no attribute 'missing'"),
        ("boundsapp:holder.missing", "boundsapp:holder has no attribute 'missing'"),
        ("boundsapp:holder.consumer", "boundsapp:holder.consumer is int, not an outboxer"),
        ("boundsapp:not_a_consumer", "boundsapp:not_a_consumer is NoneType, not an outboxer"),
    ],
)
def test_a_consumer_that_is_not_there_is_named(app_dir: Path, target: str, problem: str) -> None:
    result = CliRunner().invoke(inbox_main, [target, "--broker", "memory://bounds", "--once"])
    assert result.exit_code == 2, result.output
    assert problem in result.output, result.output


def test_an_on_failure_function_that_is_not_there_is_named(relay_db: str) -> None:
    result = outboxer_cli(
        "relay",
        "--broker",
        "memory://bounds",
        "--once",
        "--on-failure",
        "tests.relay_alerts:missing",
        env={"OUTBOXER_DB": relay_db},
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--on-failure" in line
    assert "module 'tests.relay_alerts' has no attribute 'missing'" in line, line


@pytest.mark.parametrize("how", ["option", "variable"])
def test_spaces_around_the_broker_url_are_dropped(relay_db: str, how: str) -> None:
    """A pasted space, a secret file's newline: the URL was refused as a bad password and
    its user name vanished from the masked URL."""
    url = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    padded = f" {url}\n"
    arguments = ["--broker", padded] if how == "option" else []
    env = {"OUTBOXER_DB": relay_db, **({"OUTBOXER_BROKER": padded} if how == "variable" else {})}
    result = as_process("relay", "--once", *arguments, env=env)
    assert result.returncode == 7, result.stderr  # unreachable, not an invalid URL
    line = one_error_line(result)
    assert "percent-encode" not in line, line
    assert "guest:***@127.0.0.1" in line, line


# memory:// is one process's broker --------------------------------------------------------


def test_a_relay_process_refuses_the_in_process_broker(relay_db: str) -> None:
    """``outboxer relay --broker memory://`` as a process of its own "sent" every message
    to a broker nobody else can read, and deleted it from the outbox ("3 sent", exit 0)."""
    for how in ("option", "variable"):
        arguments = ["--broker", "memory://"] if how == "option" else []
        env = {
            "OUTBOXER_DB": relay_db,
            **({"OUTBOXER_BROKER": "memory://"} if not arguments else {}),
        }
        result = as_process("relay", "--once", *arguments, env=env)
        assert result.returncode == 3, result.stderr  # invalid configuration
        line = one_error_line(result)
        assert "memory://" in line and "one process" in line, line
        assert "amqp://" in line, line  # the fix: the consumers' broker
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert outbox_rows(relay_db) == 1  # nothing sent, nothing deleted


def test_a_relay_process_sends_to_the_in_process_broker_when_told_to_discard(
    relay_db: str,
) -> None:
    """Tests of the command itself (its logs, health, exit codes) say so in the URL."""
    result = as_process("relay", "--once", "--broker", "memory://?discard=true",
                        env={"OUTBOXER_DB": relay_db})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 sent" in result.stderr
    assert outbox_rows(relay_db) == 0


def test_a_relay_called_in_this_process_keeps_the_in_process_broker(relay_db: str) -> None:
    """Called from Python (tests), the relay shares the process with whoever reads it."""
    result = outboxer_cli(
        "relay", "--broker", "memory://bounds-here", "--once", env={"OUTBOXER_DB": relay_db}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(MemoryBroker.named("bounds-here").published) == 1


def test_an_inbox_without_its_relay_on_the_in_process_broker_is_warned(tmp_path: Path) -> None:
    """With --no-relay, memory:// receives only what this process sends (here the
    application module's own relay): it works, with a warning that nothing from another
    process can arrive."""
    env = logapp_env(tmp_path)
    result = inbox_once(tmp_path, env, "--no-relay")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mark").read_text() == "started"  # the message was handled
    lines = result.stderr.splitlines()
    warnings = [line for line in lines if "WARNING" in line and "memory://" in line]
    assert len(warnings) == 1, result.stderr
    assert "--no-relay" in warnings[0] and "another process" in warnings[0], warnings[0]
    with_relay = inbox_once(tmp_path, env)
    assert with_relay.returncode == 0, with_relay.stderr
    assert "another process" not in with_relay.stderr
