"""Fail-fast configuration: each impossible setting raises outboxer's own error when it is
made, naming the setting and the fix; and ``Retry(max_retries=...)``."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.errors import InvalidName
from outboxer.testing import MemoryBroker, MemoryTransport

from .models import OrderPlaced


@pytest.fixture
def Session() -> sessionmaker[outboxer.OutboxSession]:
    return sessionmaker(create_engine("sqlite://"), class_=outboxer.OutboxSession)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"batch_size": "100"}, "batch_size must be a whole number, got '100'"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"unroutable_attempts": True}, "unroutable_attempts must be a whole number"),
        ({"lease": 0}, "lease must be > 0 seconds"),
        ({"poll_interval": -1}, "poll_interval must be > 0 seconds"),
        ({"prune_interval": float("nan")}, "prune_interval must be a number"),
        ({"poll_interval": float("inf")}, "poll_interval must be a finite number of seconds"),
        ({"lease": float("inf")}, "lease must be a finite number of seconds"),
        ({"retention": -5}, "retention must be >= 0"),
        ({"backoff": 2.0}, r"backoff must be an outboxer.Backoff"),
        ({"destinations": "orders"}, "destinations must be a non-empty list"),
    ],
)
def test_an_impossible_relay_setting_is_a_configuration_error(
    options: dict[str, Any], message: str
) -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(outboxer.ConfigurationError, match=message):
        outboxer.Relay(engine, MemoryTransport(MemoryBroker()), **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefetch": 0}, "prefetch must be >= 1"),
        ({"prefetch": "50"}, "prefetch must be a whole number"),
        ({"inbox_retention": 0}, "inbox_retention must be > 0 seconds"),
        ({"dead_letter_retention": -1.0}, "dead_letter_retention must be > 0 seconds"),
        ({"inbox_retention": float("inf")}, "inbox_retention must be a finite number of"),
        ({"retry": 3}, "retry must be an outboxer.Retry"),
        ({"name": ""}, "a consumer needs a name"),
    ],
)
def test_an_impossible_consumer_setting_is_a_configuration_error(
    Session: sessionmaker[outboxer.OutboxSession], options: dict[str, Any], message: str
) -> None:
    options = {"name": "billing", **options}
    with pytest.raises(outboxer.ConfigurationError, match=message):
        outboxer.Consumer(Session, **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"idle_timeout": 0}, "idle_timeout must be > 0 seconds"),
        ({"extend_by": "60"}, "extend_by must be a number"),
        ({"extend_after": float("inf")}, "extend_after must be a finite number of seconds"),
    ],
)
def test_an_impossible_run_option_is_refused_before_anything_runs(
    Session: sessionmaker[outboxer.OutboxSession], options: dict[str, Any], message: str
) -> None:
    consumer = outboxer.Consumer(Session, name="billing")
    consumer.handler(OrderPlaced)(lambda event: None)
    with pytest.raises(outboxer.ConfigurationError, match=message):
        consumer.run(MemoryTransport(MemoryBroker()), once=True, **options)


def test_wrong_kinds_of_arguments_are_configuration_errors(
    Session: sessionmaker[outboxer.OutboxSession],
) -> None:
    engine = create_engine("sqlite://")
    transport = MemoryTransport(MemoryBroker())
    with pytest.raises(outboxer.ConfigurationError, match="needs a SQLAlchemy Engine"):
        outboxer.Relay("sqlite://", transport)  # type: ignore[arg-type]
    with pytest.raises(outboxer.ConfigurationError, match="needs a transport"):
        outboxer.Relay(engine, "amqp://localhost")  # type: ignore[arg-type]
    with pytest.raises(outboxer.ConfigurationError, match="session_factory must be"):
        outboxer.Consumer(engine, name="billing")  # type: ignore[arg-type]
    with pytest.raises(outboxer.ConfigurationError, match="needs a session factory"):
        outboxer.DeadLetters(engine)  # type: ignore[arg-type]
    with pytest.raises(outboxer.ConfigurationError, match="a broker URL is a string"):
        outboxer.transport_from_url(None)  # type: ignore[arg-type]
    consumer = outboxer.Consumer(Session, name="billing")
    with pytest.raises(outboxer.ConfigurationError, match=r"OrderPlaced has no field 'orderid'"):
        consumer.handler(OrderPlaced, dedup_key="orderid")(lambda event: None)
    with pytest.raises(outboxer.ConfigurationError, match="destination must be a name"):
        consumer.handler("stock.reserved", destination=5)(lambda event: None)  # type: ignore[arg-type]


def test_a_consumer_name_the_broker_would_refuse_stops_run_before_it_starts(
    Session: sessionmaker[outboxer.OutboxSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = outboxer.Consumer(Session, name="shop.billing")
    consumer.handler(OrderPlaced)(lambda event: None)
    transport = MemoryTransport(MemoryBroker())
    # The memory transport accepts any name; speak as SQS does, without a network.
    monkeypatch.setattr(
        type(transport), "validate_name", lambda self, name, what="name": _as_sqs(name, what)
    )
    with pytest.raises(InvalidName, match=r"consumer 'shop.billing'.*use 'shop-billing'"):
        consumer.run(transport, once=True)


def _as_sqs(name: str, what: str) -> None:
    from outboxer.transports.names import require_valid_name

    require_valid_name("sqs", name, what)


# Retry: max_retries beside max_attempts ----------------------------------------------------


def test_max_retries_counts_the_runs_after_the_first() -> None:
    retry = outboxer.Retry(max_retries=2, initial_delay=0.5)
    assert retry.max_attempts == 3 and retry.max_retries == 2
    assert retry == outboxer.Retry(max_attempts=3, initial_delay=0.5)
    assert outboxer.Retry().max_attempts == 3
    assert outboxer.Retry(max_retries=0).max_attempts == 1
    # Decisions: two retries, then the dead letter.
    error = ConnectionError("down")
    verdicts = [retry.decide(attempt, error, lambda: 0.5).verdict.value for attempt in (1, 2, 3)]
    assert verdicts == ["retry_later", "retry_later", "give_up"]


def test_max_retries_and_max_attempts_together_are_refused() -> None:
    with pytest.raises(outboxer.RetryConfigError, match=r"give one of them.*max_retries=N is"):
        outboxer.Retry(max_attempts=3, max_retries=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_retries": -1}, "max_retries must be a whole number >= 0"),
        ({"max_retries": 1.5}, "max_retries must be a whole number"),
        ({"max_attempts": True}, "max_attempts must be a whole number >= 1"),
        ({"max_retries": 1, "instant": 2}, r"instant=2 retries need max_retries >= 2, got 1"),
        ({"initial_delay": "1s"}, "initial_delay must be a number"),
    ],
)
def test_impossible_retry_counts_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(outboxer.RetryConfigError, match=message):
        outboxer.Retry(**options)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["relay", "--poll-interval", "inf"], "--poll-interval"),
        (["relay", "--lease", "nan"], "--lease"),
        (["relay", "--retention", "inf"], "--retention"),
    ],
)
def test_a_duration_that_is_not_finite_is_refused_by_the_command_line(
    args: list[str], option: str
) -> None:
    """click's FloatRange lets ``nan`` and ``inf`` through its bounds; the relay then took
    an infinite poll interval (it never polled) without a word."""
    from click.testing import CliRunner

    from outboxer.cli import main

    result = CliRunner().invoke(main, [*args, "--db", "sqlite://", "--broker", "memory://"])
    assert result.exit_code == 2, result.output
    assert option in result.output and "not a finite number of seconds" in result.output
