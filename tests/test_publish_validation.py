"""What ``publish()`` refuses so that a message cannot harm others later.

* A user header named ``CC`` or ``BCC``: RabbitMQ reads those (sender-selected
  distribution), wants an array there and closes the channel on a string
  (``406 PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header,"CC",longstr}``).
  The relay took the close for a failure of every message in flight: its batch-mates were
  sent twice and, with a small ``max_attempts``, dead-lettered. ``publish()`` refuses the
  names; a row that holds one anyway (an older version, SQL by hand) is dead-lettered
  alone by the RabbitMQ transport, and the rows beside it are sent once. RabbitMQ matches
  the names exactly: ``cc``, ``Bcc`` pass (checked here against the real broker), and
  SQS carries ``CC`` like any other header.
* A ``delay=`` past :data:`outboxer.checks.MAX_DURATION` (100 years, the longest duration
  the command line takes): the application's own COMMIT failed with a raw driver error
  (SQLite ``OverflowError``, MariaDB 1441/1916, PostgreSQL "interval out of range") and
  the business transaction rolled back.
* A message type name holding ``*`` or ``#``: on RabbitMQ the type is the binding key of
  the consumer's queue on a topic exchange, so a handler of ``orders.*`` received every
  ``orders.placed`` and dead-lettered it as ``unknown_type``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine

import outboxer
from outboxer.errors import ConfigurationError, InvalidHeaders, UnknownMessageType
from outboxer.message import registered_type
from outboxer.publishing import build_message

from .models import Order
from .relaying import SessionFactory, Target, outbox_count, payloads, sqs_target

MAX_DURATION = 36500 * 86400.0
"""100 years: the cap of ``delay=``, the same as the command line's durations."""

SQLITE_ONLY = pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)


def insert_row(engine: Engine, destination: str, n: int, headers: dict[str, str]) -> None:
    """An outbox row written without ``publish()`` (an older version, a data migration)."""
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(
            insert(outboxer.outbox).values(
                message_id=uuid.uuid4(),
                message_type="test.ok",
                destination=destination,
                payload=json.dumps({"n": n}).encode(),
                headers=json.dumps(headers),
                occurred_at=now,
                available_at=now,
            )
        )


def publish_numbered(Session: SessionFactory, destination: str, numbers: range) -> None:
    with Session.begin() as session:
        for n in numbers:
            session.publish(
                {"n": n}, type="test.ok", destination=destination, headers={"cc": f"lower{n}"}
            )


# CC and BCC -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CC", "BCC"])
@SQLITE_ONLY
def test_publish_refuses_a_header_rabbitmq_reads_as_sender_selected_distribution(
    engine: Engine, Session: SessionFactory, name: str
) -> None:
    with Session() as session, pytest.raises(InvalidHeaders) as caught:
        session.publish({"n": 1}, type="test.ok", destination="orders", headers={name: "x"})
    message = str(caught.value)
    assert repr(name) in message and "RabbitMQ" in message and "rename" in message
    assert outbox_count(engine) == 0


@pytest.mark.parametrize("name", ["cc", "Cc", "bcc", "Bcc", "x-cc", " CC", "CC "])
@SQLITE_ONLY
def test_names_rabbitmq_does_not_read_are_ordinary_headers(
    engine: Engine, Session: SessionFactory, name: str
) -> None:
    with Session.begin() as session:
        session.publish({"n": 1}, type="test.ok", destination="orders", headers={name: "x"})
    assert outbox_count(engine) == 1


@pytest.mark.parametrize("name", ["CC", "BCC"])
def test_rabbitmq_dead_letters_a_row_with_a_cc_header_alone_and_sends_the_others_once(
    engine: Engine, Session: SessionFactory, rabbit: Target, name: str
) -> None:
    """The others also carry a ``cc`` header (lower case), which RabbitMQ passes on."""
    publish_numbered(Session, rabbit.destination, range(5))
    insert_row(engine, rabbit.destination, 99, {name: "someone", "label": "poison"})
    publish_numbered(Session, rabbit.destination, range(5, 10))
    relay = outboxer.Relay(engine, rabbit.transport, max_attempts=1)
    stats = relay.run(once=True)
    assert (stats.sent, stats.dead_lettered, stats.retried) == (10, 1, 0)
    deliveries = rabbit.collect(10)
    assert sorted(p["n"] for p in payloads(deliveries)) == list(range(10))
    assert sorted(d.headers["cc"] for d in deliveries) == sorted(f"lower{n}" for n in range(10))
    [letter] = outboxer.DeadLetters(Session).list()
    assert letter.error_type == "invalid_message"
    assert f"header {name!r}" in letter.error_message
    assert "RabbitMQ" in letter.error_message and "rename" in letter.error_message
    assert letter.headers[name] == "someone" and json.loads(letter.payload) == {"n": 99}
    assert outbox_count(engine) == 0


@pytest.mark.parametrize("fifo", [False, True], ids=["sqs", "sqs-fifo"])
@SQLITE_ONLY
def test_sqs_carries_a_cc_header_like_any_other(
    engine: Engine, moto_endpoint: str, fifo: bool
) -> None:
    target = sqs_target(moto_endpoint, fifo)
    try:
        insert_row(engine, target.destination, 1, {"CC": "someone", "BCC": "else"})
        stats = outboxer.Relay(engine, target.transport).run(once=True)
        assert (stats.sent, stats.dead_lettered) == (1, 0)
        [delivery] = target.collect(1)
        assert (delivery.headers["CC"], delivery.headers["BCC"]) == ("someone", "else")
    finally:
        target.close()


# delay ------------------------------------------------------------------------------------


def test_the_cap_is_the_command_lines() -> None:
    from outboxer import checks
    from outboxer.cli import common

    assert checks.MAX_DURATION == common.MAX_DURATION == MAX_DURATION


TOO_FAR: list[Any] = [MAX_DURATION + 1, 3e11, 1e13, timedelta.max, timedelta(days=36501)]


@pytest.mark.parametrize("delay", TOO_FAR, ids=repr)
def test_a_delay_past_the_cap_is_refused_by_publish_and_the_commit_succeeds(
    engine: Engine, Session: SessionFactory, delay: Any
) -> None:
    with Session() as session:
        session.add(Order(id=1, customer="ada"))
        with pytest.raises(ConfigurationError) as caught:
            session.publish({"n": 1}, type="test.ok", destination="orders", delay=delay)
        assert "delay" in str(caught.value) and "100 years" in str(caught.value)
        session.commit()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Order)).scalar_one() == 1
    assert outbox_count(engine) == 0


@pytest.mark.parametrize("delay", [MAX_DURATION, timedelta(days=36500)], ids=repr)
def test_a_delay_of_exactly_the_cap_is_stored_and_not_sent(
    engine: Engine, Session: SessionFactory, delay: Any
) -> None:
    with Session.begin() as session:
        session.add(Order(id=1, customer="ada"))
        session.publish({"n": 1}, type="test.ok", destination="orders", delay=delay)
    with engine.connect() as conn:
        available_at = conn.execute(select(outboxer.outbox.c.available_at)).scalar_one()
    assert available_at > datetime.now(timezone.utc) + timedelta(days=36499)
    transport = outboxer.transport_from_url("memory://")
    try:
        stats = outboxer.Relay(engine, transport).run(once=True)
    finally:
        transport.close()
    assert stats.sent == 0 and outbox_count(engine) == 1


# wildcard type names ----------------------------------------------------------------------

WILDCARDS = ["orders.*", "orders.#", "#", "*", "orders.pl*ced", "a#b"]


@pytest.mark.parametrize("name", WILDCARDS)
def test_a_message_type_name_with_a_topic_wildcard_is_refused(name: str) -> None:
    with pytest.raises(ConfigurationError) as caught:

        @outboxer.message(name, destination="orders")
        @dataclass
        class Wild:
            n: int

    assert repr(name) in str(caught.value) and "wildcard" in str(caught.value)
    assert registered_type(name) is None


@pytest.mark.parametrize("name", WILDCARDS)
@SQLITE_ONLY
def test_publish_refuses_a_type_with_a_topic_wildcard(Session: SessionFactory, name: str) -> None:
    with Session() as session, pytest.raises(UnknownMessageType) as caught:
        session.publish({"n": 1}, type=name, destination="orders")
    assert repr(name) in str(caught.value) and "wildcard" in str(caught.value)


@pytest.mark.parametrize("name", WILDCARDS)
@SQLITE_ONLY
def test_a_handler_for_a_type_with_a_topic_wildcard_is_refused(
    Session: SessionFactory, name: str
) -> None:
    consumer = outboxer.Consumer(Session, name="wild")
    with pytest.raises(ConfigurationError) as caught:

        @consumer.handler(name, destination="orders")
        def on_wild(event: dict[str, Any]) -> None:
            pass

    assert repr(name) in str(caught.value) and "wildcard" in str(caught.value)


def test_a_dict_of_a_registered_type_without_a_destination_says_what_to_pass() -> None:
    """The message used to say "declare it with @outboxer.message(..., destination=...)",
    which the type already was: a dict does not take its class's destination."""
    from .models import OrderPlaced

    with pytest.raises(outboxer.MissingDestination) as raised:
        build_message({"order_id": 1}, type="test.order_placed")
    text = str(raised.value)
    assert "declare it with" not in text
    assert "destination 'orders' declared for OrderPlaced" in text
    assert "destination='orders'" in text
    assert OrderPlaced.__name__ in text


def test_a_dict_of_an_unregistered_type_without_a_destination_names_publish() -> None:
    with pytest.raises(outboxer.MissingDestination, match=r"pass destination=\.\.\. to publish"):
        build_message({"x": 1}, type="test.nobody_declared_this")
