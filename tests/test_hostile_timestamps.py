"""Times from a delivery whose UTC instant no database column, no Python datetime, or no
PostgreSQL session time zone can hold (review 5, defect 1).

``0001-01-01T00:00:00+14:00`` is valid ISO 8601 with a zone, but in UTC it is a day of
the year 0. Old code took it as the occurred-at time: a failing handler's retry row was
stored by PostgreSQL as ``0001-12-31 10:00:00+00 BC``, and from then on every relay claim
that returned it failed to read it (``psycopg.DataError: timestamp too small``): nothing
in the outbox was sent again, other keys included. An unknown type's dead letter, or a
forged ``outboxer-first-failed-at``, broke ``DeadLetters.list()`` and ``outboxer
dead-letter list`` the same way; on SQLite and MariaDB the writes failed and the message
was quarantined with a misleading reason.

Now such a time is a ``malformed_envelope`` (occurred-at), or replaced by now
(first-failed-at, an adapter's occurred-at); PostgreSQL binds are put in UTC in Python;
and rows written in the old shape are read clamped, so the relay dead-letters them and
sends the rest, and the dead-letter tools list them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pika
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer import wire
from outboxer.cli import main as cli_main
from outboxer.errors import DecodeError
from outboxer.testing import MemoryBroker, MemoryTransport

from .broker_rabbitmq import RabbitMQCase
from .models import OrderPlaced
from .services import RABBITMQ_URL
from .test_consumer_hostile import good_headers

SessionFactory = sessionmaker[outboxer.OutboxSession]

HOSTILE = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]
"""Valid ISO 8601 with a zone; in UTC, a day of the years 0 and 10000."""

FIRST_FAILED_AT = "outboxer-first-failed-at"


@pytest.fixture
def rabbit(rabbitmq_case: RabbitMQCase) -> RabbitMQCase:
    return rabbitmq_case


def subscribed(case: RabbitMQCase, consumer: outboxer.Consumer) -> None:
    case.queues.append(consumer.name)
    case.exchanges.append(consumer.name)
    case.transport.receiver(consumer.subscription()).close()


def raw_publish(exchange: str, body: bytes, headers: dict[str, str]) -> None:
    """Publish as a stranger with a raw pika client: outboxer's own headers, forged."""
    headers = dict(headers)
    properties = pika.BasicProperties(
        message_id=headers.pop(wire.MESSAGE_ID),
        type=headers.pop(wire.TYPE),
        content_type=headers.pop(wire.CONTENT_TYPE, "application/json"),
        headers=headers,
    )
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        connection.channel().basic_publish(exchange, properties.type, body, properties)
    finally:
        connection.close()  # synchronous: the broker has the message when it returns


def outbox_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(outboxer.outbox.c.id)).all())


def relay_the_rest(engine: Engine, Session: SessionFactory) -> tuple[int, MemoryBroker]:
    """Publish five messages of five keys; relay once into the memory broker."""
    with Session.begin() as session:
        for n in range(5):
            session.publish(OrderPlaced(order_id=100 + n))
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    stats = outboxer.Relay(engine, transport).run(once=True)
    return stats.sent, broker


def listed_by_the_command(db_url: str) -> list[dict[str, Any]]:
    """``outboxer dead-letter list --json``: the letters, read by the command line."""
    result = CliRunner().invoke(cli_main, ["dead-letter", "list", "--json", "--db", db_url])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]


def error_types(letters: list[dict[str, Any]]) -> list[str]:
    return sorted(letter["error_type"] for letter in letters)


# Over real RabbitMQ, on every database -------------------------------------------------------


@pytest.mark.parametrize("when", HOSTILE)
def test_a_failing_handlers_message_with_an_occurred_at_outside_the_calendar_wedges_nothing(
    engine: Engine, Session: SessionFactory, db_url: str, rabbit: RabbitMQCase, when: str
) -> None:
    """Old code: PostgreSQL stored the retry row at ``0001-12-31 10:00:00+00 BC`` and the
    relay then raised ``DataError`` on every claim, sending nothing; SQLite and MariaDB
    refused the retry row and its dead letter (``OverflowError``) and quarantined the
    message after 1 of 3 attempts."""
    consumer = outboxer.Consumer(
        Session,
        name=rabbit.unique("times"),
        retry=outboxer.Retry(max_attempts=3, initial_delay=0.001, max_delay=0.001),
    )
    calls: list[int] = []

    @consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced, session: Session) -> None:
        calls.append(event.order_id)
        raise RuntimeError("ledger down")

    subscribed(rabbit, consumer)
    raw_publish(consumer.name, b'{"order_id": 1}', good_headers(**{wire.OCCURRED_AT: when}))
    stats = consumer.run(rabbit.transport, once=True, idle_timeout=1.0)
    assert (stats.messages, stats.rejected, stats.retries_scheduled) == (1, 1, 0)
    assert calls == []  # refused before any handler runs
    [letter] = outboxer.DeadLetters(Session).list()
    assert letter.error_type == "malformed_envelope", letter.error_message
    assert wire.OCCURRED_AT in letter.error_message and when in letter.error_message
    assert "UTC" in letter.error_message
    assert outbox_count(engine) == 0  # no retry row

    sent, broker = relay_the_rest(engine, Session)
    assert sent == 5 and len(broker.published) == 5
    assert outbox_count(engine) == 0
    assert error_types(listed_by_the_command(db_url)) == ["malformed_envelope"]


@pytest.mark.parametrize("when", HOSTILE)
def test_an_unknown_types_message_with_an_occurred_at_outside_the_calendar_is_listed(
    engine: Engine, Session: SessionFactory, db_url: str, rabbit: RabbitMQCase, when: str
) -> None:
    """Old code: the unknown type's dead letter was stored with the year-0 time on
    PostgreSQL, and ``DeadLetters.list()`` and ``outboxer dead-letter list`` raised
    ``DataError`` for every letter; SQLite and MariaDB quarantined it."""
    consumer = outboxer.Consumer(Session, name=rabbit.unique("times"))

    @consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced) -> None:
        pass

    subscribed(rabbit, consumer)
    raw_publish(consumer.name, b"{}", good_headers("nobody.handles"))
    raw_publish(consumer.name, b"{}", good_headers("nobody.handles", **{wire.OCCURRED_AT: when}))
    stats = consumer.run(rabbit.transport, once=True, idle_timeout=1.0)
    assert (stats.messages, stats.rejected) == (2, 2)
    letters = outboxer.DeadLetters(Session).list()
    assert sorted(letter.error_type for letter in letters) == ["malformed_envelope", "unknown_type"]
    [bad] = [letter for letter in letters if letter.error_type == "malformed_envelope"]
    assert when in bad.error_message
    assert all(
        letter.occurred_at is None or letter.occurred_at.tzinfo is not None for letter in letters
    )
    assert error_types(listed_by_the_command(db_url)) == ["malformed_envelope", "unknown_type"]
    sent, _ = relay_the_rest(engine, Session)
    assert sent == 5


@pytest.mark.parametrize("when", HOSTILE)
def test_a_forged_first_failed_at_outside_the_calendar_is_replaced_by_now(
    engine: Engine, Session: SessionFactory, db_url: str, rabbit: RabbitMQCase, when: str
) -> None:
    """Old code: an aware first-failed-at was taken as it came: the retry row carried it
    on, and the dead letter of a handler that gave up stored it (PostgreSQL: year 0,
    then ``DataError`` from every list; SQLite/MariaDB: quarantined)."""
    consumer = outboxer.Consumer(
        Session,
        name=rabbit.unique("times"),
        retry=outboxer.Retry(max_attempts=2, initial_delay=0.001, max_delay=0.001),
    )

    @consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced) -> None:
        raise RuntimeError("ledger down")

    subscribed(rabbit, consumer)
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    # The first delivery fails once: a retry row, whose first-failed-at is now.
    raw_publish(consumer.name, b'{"order_id": 1}', good_headers(**{FIRST_FAILED_AT: when}))
    # A retry's second attempt (a forged one) gives up: a dead letter.
    raw_publish(
        consumer.name,
        b'{"order_id": 2}',
        good_headers(
            **{
                FIRST_FAILED_AT: when,
                wire.HANDLER: f"{consumer.name}:charge",
                wire.ATTEMPT: "2",
            }
        ),
    )
    stats = consumer.run(rabbit.transport, once=True, idle_timeout=1.0)
    assert (stats.retries_scheduled, stats.dead_lettered) == (1, 1), stats
    with engine.connect() as conn:
        [headers] = conn.execute(select(outboxer.outbox.c.headers)).scalars()
    retried = datetime.fromisoformat(json.loads(headers)[FIRST_FAILED_AT])
    assert retried >= start and retried.tzinfo is not None
    [letter] = outboxer.DeadLetters(Session).list()
    assert letter.error_type == "RuntimeError" and letter.first_failed_at >= start
    assert error_types(listed_by_the_command(db_url)) == ["RuntimeError"]
    sent, _ = relay_the_rest(engine, Session)
    assert sent == 6  # the retry row too


# The other ways a delivery's time comes in ----------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        *HOSTILE,
        "0001-01-01T12:00:00+00:00",  # a Python datetime, but BC in a session at UTC-5
        "9999-12-31T12:00:00+00:00",  # a Python datetime, but year 10000 at UTC+14
    ],
)
def test_decode_refuses_an_occurred_at_that_not_every_time_zone_can_show(when: str) -> None:
    with pytest.raises(DecodeError, match="UTC"):
        wire.decode(b"{}", good_headers(**{wire.OCCURRED_AT: when}), "orders")


@pytest.mark.parametrize(
    "when",
    ["0001-01-02T00:00:00+00:00", "9999-12-30T23:59:59.999999+00:00", "2026-01-01T09:00+09:00"],
)
def test_decode_takes_the_times_up_to_a_day_from_the_calendars_ends_in_utc(when: str) -> None:
    envelope = wire.decode(b"{}", good_headers(**{wire.OCCURRED_AT: when}), "orders")
    assert envelope.occurred_at == datetime.fromisoformat(when)
    assert envelope.occurred_at.utcoffset() == timedelta(0)


@outboxer.message("test.hostile_timestamps.payment")
@dataclass
class Payment:
    payment_id: str


@pytest.mark.parametrize("when", HOSTILE)
def test_an_adapters_occurred_at_outside_the_calendar_is_replaced_by_now(
    engine: Engine, Session: SessionFactory, db_url: str, when: str
) -> None:
    """Old code: an adapter took the header's time as it came; its handler's dead letter
    then broke the dead-letter tools (PostgreSQL) or was quarantined (SQLite, MariaDB)."""
    consumer = outboxer.Consumer(Session, name="payments", retry=outboxer.Retry(max_attempts=1))

    @consumer.adapter(Payment, queue="webhooks")
    def record(event: Payment) -> None:
        raise RuntimeError("ledger down")

    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.receiver(consumer.subscription()).close()
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    broker.inject("webhooks", b'{"payment_id": "p-1"}', {wire.OCCURRED_AT: when})
    stats = consumer.run(transport, once=True, idle_timeout=0.1)
    assert stats.dead_lettered == 1
    [letter] = outboxer.DeadLetters(Session).list()
    assert letter.error_type == "RuntimeError"
    assert letter.occurred_at is not None and letter.occurred_at >= start
    assert error_types(listed_by_the_command(db_url)) == ["RuntimeError"]


def test_a_time_outside_the_calendar_in_utc_cannot_be_stored(engine: Engine) -> None:
    """Old code, PostgreSQL: the aware value went to the driver as it was and was stored
    as ``0001-12-31 10:00:00+00 BC``, which no read could load again."""
    moment = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
    row = {
        "message_id": outboxer.uuid7(),
        "message_type": "test.order_placed",
        "destination": "orders",
        "payload": b"{}",
        "occurred_at": moment,
        "available_at": datetime.now(timezone.utc),
    }
    with (
        pytest.raises(StatementError, match="cannot be stored: it is outside"),
        engine.begin() as conn,
    ):
        conn.execute(insert(outboxer.outbox).values(**row))
    assert outbox_count(engine) == 0


# Rows written in the old shape, by hand, on PostgreSQL ---------------------------------------


def insert_raw_outbox_row(
    engine: Engine, key: str, occurred_at: str, first_failed_at: str | None = None
) -> int:
    with engine.begin() as conn:
        return int(
            conn.execute(
                text(
                    "INSERT INTO outboxer_outbox (message_id, message_type, destination, "
                    "message_key, payload, headers, occurred_at, available_at, first_failed_at) "
                    "VALUES (:id, 'test.order_placed', 'orders', :key, :payload, '{}', "
                    "CAST(:occurred AS timestamptz), now() - interval '1 second', "
                    "CAST(:failed AS timestamptz)) RETURNING id"
                ),
                {
                    "id": outboxer.uuid7(),
                    "key": key,
                    "payload": b'{"order_id": 9}',
                    "occurred": occurred_at,
                    "failed": first_failed_at,
                },
            ).scalar_one()
        )


OLD_SHAPES = [
    "0001-12-31 10:00:00+00 BC",
    "10000-01-01 13:59:59+00",
    "infinity",
    "-infinity",
]


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
@pytest.mark.parametrize("session_zone", ["UTC", "America/New_York", "Pacific/Kiritimati"])
def test_the_relay_dead_letters_a_row_whose_time_cannot_be_read_and_sends_the_others(
    engine: Engine, db_url: str, session_zone: str
) -> None:
    """Old code: ``DataError: timestamp too small (before year 1)`` out of every claim:
    ``outboxer relay --once`` died, a running relay retried forever, nothing was sent.
    In a session whose time zone is west of UTC, a time that is year 1 in UTC is BC."""
    zoned = create_engine(db_url, connect_args={"options": f"-c TimeZone={session_zone}"})
    ZonedSession = sessionmaker(zoned, class_=outboxer.OutboxSession)
    with ZonedSession.begin() as session:
        session.publish(OrderPlaced(order_id=1))
    bad = [insert_raw_outbox_row(engine, "1", shape) for shape in OLD_SHAPES]
    edge = insert_raw_outbox_row(engine, "edge", "0001-01-01 05:00:00+00")
    failed_long_ago = insert_raw_outbox_row(
        engine, "7", "2026-01-01 00:00:00+00", first_failed_at="0001-12-31 10:00:00+00 BC"
    )
    try:
        sent, broker = relay_the_rest(zoned, ZonedSession)
        letters = outboxer.DeadLetters(ZonedSession).list()
        output = listed_by_the_command(db_url)
    finally:
        zoned.dispose()
    # order 1, the row whose first failure is unreadable, and the five keys
    assert sent == 7 and len(broker.published) == 7
    assert outbox_count(engine) == 0
    assert sorted(letter.error_type for letter in letters) == ["invalid_message"] * 5
    for letter in letters:
        assert "occurred_at" in letter.error_message and "UTC" in letter.error_message
        assert letter.occurred_at is not None
        assert datetime(1, 1, 2, tzinfo=timezone.utc) <= letter.occurred_at
        assert letter.occurred_at < datetime(9999, 12, 31, tzinfo=timezone.utc)
    named = " ".join(letter.error_message for letter in letters)
    assert all(f"outbox row {row_id}:" in named for row_id in [*bad, edge])
    assert f"outbox row {failed_long_ago}:" not in named
    assert error_types(output) == ["invalid_message"] * 5


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_dead_letter_whose_times_cannot_be_read_is_still_listed(
    engine: Engine, Session: SessionFactory, db_url: str
) -> None:
    """Old code: ``DeadLetters.list()`` raised ``DataError`` and ``outboxer dead-letter
    list`` exited 1 with two tracebacks, for every letter of the table."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outboxer_dead_letter (origin, message_id, message_type, "
                "destination, payload, occurred_at, error_type, error_message, attempts, "
                "first_failed_at, last_failed_at) VALUES ('consumer', :id, 'test.order_placed', "
                "'orders', :payload, CAST(:bc AS timestamptz), 'unknown_type', 'old', 1, "
                "CAST(:bc AS timestamptz), now())"
            ),
            {"id": outboxer.uuid7(), "payload": b"{}", "bc": "0001-12-31 10:00:00+00 BC"},
        )
    [letter] = outboxer.DeadLetters(Session).list()
    assert letter.occurred_at is not None and letter.occurred_at.year == 1
    assert error_types(listed_by_the_command(db_url)) == ["unknown_type"]
