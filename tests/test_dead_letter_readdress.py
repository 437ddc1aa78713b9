"""A dead letter addressed to one handler stays addressed to it, and can be re-addressed.

A retry or replay for a handler the consumer does not have (renamed, retired) is parked as
``unknown_handler`` with the handler it was for; replaying it goes to that handler alone
(never to every handler of its type), and comes back as it was while the consumer still
lacks it. ``DeadLetters.replay(id, to_handler="consumer:handler")`` and
``outboxer dead-letter replay ID --to-handler consumer:handler`` send it to the handler
that does that work now (docs/dead-letters.md, "A handler that was renamed").
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import dead_letters as dead_letters_module
from outboxer import wire
from outboxer.cli import main
from outboxer.errors import ConfigurationError, OutboxerError
from outboxer.message import Envelope
from outboxer.store.dead_letters import NewDeadLetter, insert_dead_letters
from outboxer.tables import dead_letter, outbox
from outboxer.testing import drain

from .broker_rabbitmq import RabbitMQCase
from .models import OrderPlaced, OrderShipped

SessionFactory = sessionmaker[OrmSession]
ONCE = outboxer.Retry(max_attempts=1)


class Billing:
    """Consumer ``name`` as deployed now: ``reserve`` and ``charge`` handle OrderPlaced
    (``charge`` was called ``charge_v1`` before), ``ship`` handles OrderShipped."""

    def __init__(self, Session: SessionFactory, name: str = "billing", **options: Any) -> None:
        self.runs: Counter[str] = Counter()
        self.consumer = outboxer.Consumer(Session, name=name, retry=ONCE)
        self.name = name

        @self.consumer.handler(OrderPlaced, **options)
        def reserve(event: OrderPlaced) -> None:
            self.runs["reserve"] += 1

        @self.consumer.handler(OrderPlaced, **options)
        def charge(event: OrderPlaced) -> None:
            self.runs["charge"] += 1

        @self.consumer.handler(OrderShipped, **options)
        def ship(event: OrderShipped) -> None:
            self.runs["ship"] += 1

    def deliver(self, address: str, message_type: str = "test.order_placed") -> None:
        """A retry or replay addressed to ``address`` arrives off the consumer's queue."""
        envelope = Envelope(
            message_id=uuid.uuid4(),
            type=message_type,
            destination=self.name,
            payload=b'{"order_id": 7, "customer": "ada"}',
            occurred_at=datetime.now(timezone.utc),
            handler=address,
            attempt=1,
        )
        self.consumer.process(
            envelope.payload, wire.encode_headers(envelope), destination=self.name
        )


@pytest.fixture
def billing(Session: SessionFactory) -> Billing:
    return Billing(Session)


def _outbox_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(outbox).order_by(outbox.c.id)).mappings())


def _park(
    engine: Engine, *, handler: str, error_type: str = "unknown_handler", consumer: str = "billing"
) -> int:
    """A consumer dead letter of an OrderPlaced message addressed to ``handler``, written
    straight into the table (as an older release, or another process, wrote it)."""
    row = NewDeadLetter(
        origin="consumer",
        error_type=error_type,
        error_message="addressed to a handler consumer 'billing' does not have",
        attempts=1,
        envelope=Envelope(
            message_id=uuid.uuid4(),
            type="test.order_placed",
            destination=consumer,
            payload=b'{"order_id": 7, "customer": "ada"}',
            occurred_at=datetime.now(timezone.utc),
        ),
        destination=consumer,
        consumer=consumer,
        handler=handler,
    )
    with engine.begin() as connection:
        insert_dead_letters(connection, [row])
        return int(connection.execute(select(func.max(dead_letter.c.id))).scalar_one())


# --- the letter keeps its address ----------------------------------------------------------


def test_a_delivery_for_a_handler_the_consumer_does_not_have_keeps_that_handler(
    Session: SessionFactory, billing: Billing
) -> None:
    billing.deliver("billing:charge_v1")
    assert billing.runs == {}
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    assert (letter.origin, letter.error_type) == ("consumer", "unknown_handler")
    assert (letter.consumer, letter.handler) == ("billing", "charge_v1")
    assert [found.id for found in dead.list(handler="charge_v1")] == [letter.id]
    assert "'billing:charge_v1'" in letter.error_message
    assert "--to-handler" in letter.error_message and "billing:charge" in letter.error_message


def test_replaying_it_runs_no_other_handler_and_it_comes_back_as_it_was(
    engine: Engine, Session: SessionFactory, billing: Billing
) -> None:
    billing.deliver("billing:charge_v1")
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    dead.replay(letter.id)
    drain(engine, [billing.consumer], fail_fast=False)
    assert billing.runs == {}, "a replay for charge_v1 ran other handlers of its type"
    [back] = dead.list()
    assert back.id != letter.id and back.message_id == letter.message_id
    assert (back.origin, back.error_type) == ("consumer", "unknown_handler")
    assert (back.consumer, back.handler) == ("billing", "charge_v1")


def test_a_letter_addressed_to_a_handler_of_another_type_keeps_that_handler(
    engine: Engine, Session: SessionFactory, billing: Billing
) -> None:
    billing.deliver("billing:ship")  # an OrderPlaced for the OrderShipped handler
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    assert (letter.error_type, letter.handler) == ("handler_type_mismatch", "ship")
    assert "--to-handler" in letter.error_message
    dead.replay(letter.id)
    drain(engine, [billing.consumer], fail_fast=False)
    assert billing.runs == {}
    [back] = dead.list()
    assert (back.error_type, back.handler) == ("handler_type_mismatch", "ship")


def test_a_letter_addressed_to_another_consumers_handler_stays_parked_on_replay(
    engine: Engine, Session: SessionFactory, billing: Billing
) -> None:
    billing.deliver("shipping:pack")
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    assert (letter.consumer, letter.handler) == ("billing", "shipping:pack")
    dead.replay(letter.id)
    drain(engine, [billing.consumer], fail_fast=False)
    assert billing.runs == {}
    [back] = dead.list()
    assert (back.error_type, back.consumer, back.handler) == (
        "unknown_handler",
        "billing",
        "shipping:pack",
    )


def test_an_address_at_the_wires_limit_is_kept_whole_and_replayed_to_exactly_it(
    engine: Engine, Session: SessionFactory, billing: Billing
) -> None:
    address = "billing:" + "n" * (255 - len("billing:"))
    billing.deliver(address)
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    assert letter.handler == address.removeprefix("billing:")
    dead.replay(letter.id)
    [row] = _outbox_rows(engine)
    assert (row["target_handler"], row["destination"]) == (address, "billing")


def test_a_handler_name_too_long_for_its_column_is_kept_and_replayed_only_when_readdressed(
    engine: Engine, Session: SessionFactory
) -> None:
    """Only a write by other code than the consumer's intake (whose addresses the wire
    bounds to 255 characters) can hold a longer name: it is cut with a marker, the letter
    is listed and found by the name, and a replay asks for the handler to send it to."""
    long_name = "charge_" + "x" * 400
    letter_id = _park(engine, handler=long_name)
    dead = outboxer.DeadLetters(Session)
    stored = dead.get(letter_id)
    assert stored.handler is not None and stored.handler.endswith("…[truncated]")
    assert [found.id for found in dead.list(handler=long_name)] == [letter_id]
    with pytest.raises(OutboxerError) as refused:
        dead.replay(letter_id)
    assert f"dead letter {letter_id}" in str(refused.value)
    assert "--to-handler" in str(refused.value) and "\n" not in str(refused.value)
    skipped: list[tuple[int, str]] = []
    assert dead.replay_all(skipped=lambda i, why: skipped.append((i, why))) == 0
    assert [i for i, _ in skipped] == [letter_id] and "--to-handler" in skipped[0][1]
    assert _outbox_rows(engine) == []

    dead.replay(letter_id, to_handler="billing:charge")
    [row] = _outbox_rows(engine)
    assert (row["target_handler"], row["destination"]) == ("billing:charge", "billing")
    assert dead.list() == []


# --- re-addressing -------------------------------------------------------------------------


def test_readdressed_replay_runs_only_the_named_handler(
    engine: Engine, Session: SessionFactory, billing: Billing
) -> None:
    billing.deliver("billing:charge_v1")
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    message_id = dead.replay(letter.id, to_handler="billing:charge")
    [row] = _outbox_rows(engine)
    assert row["message_id"] == message_id == letter.message_id
    assert (row["target_handler"], row["destination"]) == ("billing:charge", "billing")
    assert row["handler_attempt"] == 1
    drain(engine, [billing.consumer], fail_fast=False)
    assert billing.runs == {"charge": 1}
    assert dead.list() == []


def test_a_handlers_own_letter_can_be_readdressed_to_another_consumer(
    engine: Engine, Session: SessionFactory
) -> None:
    """A handler moved to another consumer: the replay goes to that consumer's queue."""
    with engine.begin() as connection:
        insert_dead_letters(
            connection,
            [
                NewDeadLetter(
                    origin="handler",
                    error_type="ValueError",
                    error_message="card declined",
                    attempts=3,
                    envelope=Envelope(
                        message_id=uuid.uuid4(),
                        type="test.order_placed",
                        destination="orders",
                        payload=b'{"order_id": 7, "customer": "ada"}',
                        occurred_at=datetime.now(timezone.utc),
                    ),
                    consumer="billing",
                    handler="charge",
                )
            ],
        )
    payments = Billing(Session, name="pay:ments")  # a colon in a consumer's name, too
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    dead.replay(letter.id, to_handler="pay:ments:charge")
    [row] = _outbox_rows(engine)
    assert (row["target_handler"], row["destination"]) == ("pay:ments:charge", "pay:ments")
    drain(engine, [payments.consumer], fail_fast=False)
    assert payments.runs == {"charge": 1} and dead.list() == []


def test_keep_marks_the_letter_replayed_and_a_second_readdress_is_refused(
    engine: Engine, Session: SessionFactory
) -> None:
    letter_id = _park(engine, handler="charge_v1")
    dead = outboxer.DeadLetters(Session)
    dead.replay(letter_id, to_handler="billing:charge", keep=True)
    assert dead.list() == [] and dead.get(letter_id).replayed_at is not None
    with pytest.raises(OutboxerError, match="already replayed"):
        dead.replay(letter_id, to_handler="billing:reserve")
    assert [row["target_handler"] for row in _outbox_rows(engine)] == ["billing:charge"]


@pytest.mark.parametrize("keep", [False, True])
def test_two_operators_readdressing_one_letter_at_once_send_it_once(
    engine: Engine, Session: SessionFactory, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    letter_id = _park(engine, handler="charge_v1")
    both_read = threading.Barrier(2)
    real = dead_letters_module.replay_envelope

    def slow_replay_envelope(letter: Any, to_handler: str | None = None) -> Envelope:
        # Broken: the other one waits on the row lock (PostgreSQL, MariaDB).
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait(timeout=2)
        return real(letter, to_handler)

    monkeypatch.setattr(dead_letters_module, "replay_envelope", slow_replay_envelope)
    outcomes: list[object] = []

    def operator(to_handler: str) -> None:
        try:
            dead = outboxer.DeadLetters(Session)
            outcomes.append(dead.replay(letter_id, keep=keep, to_handler=to_handler))
        except Exception as exc:
            outcomes.append(exc)

    threads = [
        threading.Thread(target=operator, args=(address,))
        for address in ("billing:charge", "billing:reserve")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert len(_outbox_rows(engine)) == 1
    sent = [o for o in outcomes if isinstance(o, uuid.UUID)]
    refused = [o for o in outcomes if isinstance(o, OutboxerError)]
    assert len(sent) == 1 and len(refused) == 1, outcomes


def test_replay_all_readdressing_skips_a_letter_without_an_envelope_and_names_it(
    engine: Engine, Session: SessionFactory
) -> None:
    good = _park(engine, handler="charge_v1")
    with engine.begin() as connection:
        insert_dead_letters(
            connection,
            [
                NewDeadLetter(
                    origin="consumer",
                    error_type="malformed_envelope",
                    error_message="no envelope",
                    attempts=1,
                    raw_body=b"garbage",
                    consumer="billing",
                    handler="charge_v1",
                )
            ],
        )
    dead = outboxer.DeadLetters(Session)
    [unreadable] = [d.id for d in dead.list() if d.id != good]
    skipped: list[tuple[int, str]] = []
    replayed = dead.replay_all(
        consumer="billing",
        handler="charge_v1",
        to_handler="billing:charge",
        skipped=lambda i, why: skipped.append((i, why)),
    )
    assert replayed == 1 and [i for i, _ in skipped] == [unreadable]
    assert "no readable envelope" in skipped[0][1]
    assert [row["target_handler"] for row in _outbox_rows(engine)] == ["billing:charge"]
    assert [d.id for d in dead.list()] == [unreadable]


BAD_ADDRESSES = [
    ("charge", "no consumer"),
    (":charge", "no consumer"),
    ("billing:", "no handler"),
    ("billing:" + "h" * 51, "handler name too long"),
    ("c" * 201 + ":charge", "consumer name too long"),
    ("billing:ch\x1barge", "control character"),
    ("", "empty"),
]


@pytest.mark.parametrize(
    "address", [a for a, _ in BAD_ADDRESSES], ids=[i for _, i in BAD_ADDRESSES]
)
def test_a_malformed_address_is_refused_in_one_line_naming_the_form(
    engine: Engine, Session: SessionFactory, address: str
) -> None:
    letter_id = _park(engine, handler="charge_v1")
    dead = outboxer.DeadLetters(Session)
    with pytest.raises(ConfigurationError) as refused:
        dead.replay(letter_id, to_handler=address)
    message = str(refused.value)
    assert "consumer:handler" in message and "\n" not in message and "\x1b" not in message
    with pytest.raises(ConfigurationError):
        dead.replay_all(consumer="billing", handler="charge_v1", to_handler=address)
    assert [d.id for d in dead.list()] == [letter_id] and _outbox_rows(engine) == []


def test_replay_all_readdresses_only_with_a_consumer_and_handler_filter(
    engine: Engine, Session: SessionFactory, billing: Billing
) -> None:
    billing.deliver("billing:charge_v1")
    billing.deliver("billing:charge_v1")
    billing.deliver("billing:reserve_v1")
    dead = outboxer.DeadLetters(Session)
    for chosen in ({}, {"consumer": "billing"}, {"handler": "charge_v1"}):
        with pytest.raises(ConfigurationError) as refused:
            dead.replay_all(**chosen, to_handler="billing:charge")
        message = str(refused.value)
        assert "consumer=" in message and "handler=" in message and "\n" not in message
    assert len(dead.list()) == 3 and _outbox_rows(engine) == []

    replayed = dead.replay_all(consumer="billing", handler="charge_v1", to_handler="billing:charge")
    assert replayed == 2
    assert {row["target_handler"] for row in _outbox_rows(engine)} == {"billing:charge"}
    drain(engine, [billing.consumer], fail_fast=False)
    assert billing.runs == {"charge": 2}
    [left] = dead.list()
    assert (left.error_type, left.handler) == ("unknown_handler", "reserve_v1")


# --- the command line --------------------------------------------------------------------


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error: ")]


def test_the_command_readdresses_one_letter(engine: Engine) -> None:
    letter_id = _park(engine, handler="charge_v1")
    runner = CliRunner(env={"COLUMNS": "200"})
    listed = runner.invoke(
        main, ["dead-letter", "list", "--handler", "charge_v1", "--db", _url(engine)]
    )
    assert listed.exit_code == 0 and "billing:charge_v1" in listed.output, listed.output
    result = runner.invoke(
        main,
        [
            "dead-letter",
            "replay",
            str(letter_id),
            "--to-handler",
            "billing:charge",
            "--db",
            _url(engine),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"replayed dead letter {letter_id}" in result.output
    assert "to handler billing:charge" in result.output
    [row] = _outbox_rows(engine)
    assert row["target_handler"] == "billing:charge"


def test_the_command_replays_an_unknown_handlers_letter_to_that_handler(engine: Engine) -> None:
    letter_id = _park(engine, handler="charge_v1")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        main, ["dead-letter", "replay", str(letter_id), "--db", _url(engine)]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "to handler billing:charge_v1" in result.output
    [row] = _outbox_rows(engine)
    assert row["target_handler"] == "billing:charge_v1"


@pytest.mark.parametrize("address", ["charge", "billing:", "billing:" + "h" * 51])
def test_the_command_refuses_a_malformed_address_in_one_line(engine: Engine, address: str) -> None:
    letter_id = _park(engine, handler="charge_v1")
    runner = CliRunner(env={"COLUMNS": "200"})
    for args in (
        ["replay", str(letter_id), "--to-handler", address],
        [
            "replay-all",
            *("--consumer", "billing", "--handler", "charge_v1"),
            *("--to-handler", address, "--yes"),
        ],
    ):
        result = runner.invoke(main, ["dead-letter", *args, "--db", _url(engine)])
        assert result.exit_code == 2, (args, result.output, result.exception)
        [error] = _errors(result.output)
        assert "--to-handler" in error and "consumer:handler" in error
    assert _outbox_rows(engine) == []


def test_replay_all_readdresses_with_consumer_and_handler_filters_and_refuses_without(
    engine: Engine,
) -> None:
    first, second = _park(engine, handler="charge_v1"), _park(engine, handler="charge_v1")
    other = _park(engine, handler="reserve_v1")
    shipping = _park(engine, handler="charge_v1", consumer="shipping")
    runner = CliRunner(env={"COLUMNS": "200"})
    for chosen in ([], ["--consumer", "billing"], ["--handler", "charge_v1"]):
        refused = runner.invoke(
            main,
            [
                "dead-letter",
                "replay-all",
                *chosen,
                *("--to-handler", "billing:charge", "--yes"),
                *("--db", _url(engine)),
            ],
        )
        assert refused.exit_code == 2, (chosen, refused.output, refused.exception)
        [error] = _errors(refused.output)
        assert "--consumer" in error and "--handler" in error and "--to-handler" in error
    assert _outbox_rows(engine) == []

    asked = runner.invoke(
        main,
        [
            "dead-letter",
            "replay-all",
            *("--consumer", "billing", "--handler", "charge_v1"),
            *("--to-handler", "billing:charge"),
            *("--db", _url(engine)),
        ],
        input="y\n",
    )
    assert asked.exit_code == 0, (asked.output, asked.exception)
    assert "replay 2 dead letters to handler billing:charge?" in asked.output
    assert "replayed 2 of 2 dead letters" in asked.output
    assert [row["target_handler"] for row in _outbox_rows(engine)] == ["billing:charge"] * 2
    left = [d.id for d in outboxer.DeadLetters(sessionmaker(engine)).list()]
    assert sorted(left) == [other, shipping]
    assert first != second


def test_readdressing_leaves_another_consumers_handler_of_the_same_name(
    engine: Engine, Session: SessionFactory
) -> None:
    """billing and shipping both have a handler named ``handle``: re-addressing billing's
    letters must not take shipping's (deleted, and run by billing's handler)."""
    billing = _park(engine, handler="handle")
    shipping = _park(engine, handler="handle", consumer="shipping")
    dead = outboxer.DeadLetters(Session)
    with pytest.raises(ConfigurationError):
        dead.replay_all(handler="handle", to_handler="billing:handle_v2")
    assert {d.id for d in dead.list()} == {billing, shipping} and _outbox_rows(engine) == []
    replayed = dead.replay_all(consumer="billing", handler="handle", to_handler="billing:handle_v2")
    assert replayed == 1
    [row] = _outbox_rows(engine)
    assert (row["destination"], row["target_handler"]) == ("billing", "billing:handle_v2")
    assert [d.id for d in dead.list()] == [shipping]


@pytest.mark.parametrize("name", ["replay", "replay-all"])
def test_the_help_explains_to_handler(name: str) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["dead-letter", name, "--help"])
    assert result.exit_code == 0 and "--to-handler" in result.output
    assert "consumer:handler" in result.output


# --- end to end through RabbitMQ ------------------------------------------------------------


@pytest.fixture
def rabbitmq(rabbitmq_case: RabbitMQCase) -> RabbitMQCase:
    return rabbitmq_case


def test_a_renamed_handlers_letter_through_rabbitmq(
    engine: Engine, Session: SessionFactory, rabbitmq: RabbitMQCase
) -> None:
    """Release 1 has ``charge_v1``, which fails; release 2 renamed it ``charge`` and added
    ``reserve``. Replaying the release-1 letter parks it as unknown_handler, a replay of
    that runs neither handler, and the re-addressed replay runs ``charge`` alone."""
    name = rabbitmq.unique("billing")
    destination = rabbitmq.new_destination()
    rabbitmq.queues.append(name)
    rabbitmq.exchanges.append(name)  # the consumer's own exchange (retries, replays)
    transport = rabbitmq.transport
    release_1 = outboxer.Consumer(Session, name=name, retry=ONCE)

    @release_1.handler(OrderPlaced, destination=destination, name="charge_v1")
    def charge_v1(event: OrderPlaced) -> None:
        raise ValueError("card declined")

    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=7), destination=destination)  # type: ignore[attr-defined]
    drain(engine, [release_1], transport, fail_fast=False, idle_timeout=1.0)
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    assert (letter.origin, letter.consumer, letter.handler) == ("handler", name, "charge_v1")

    release_2 = Billing(Session, name=name, destination=destination)
    dead.replay(letter.id)
    drain(engine, [release_2.consumer], transport, fail_fast=False, idle_timeout=1.0)
    [parked] = dead.list()
    assert (parked.origin, parked.error_type) == ("consumer", "unknown_handler")

    dead.replay(parked.id)
    drain(engine, [release_2.consumer], transport, fail_fast=False, idle_timeout=1.0)
    assert release_2.runs == {}, "a replay for charge_v1 ran other handlers of its type"
    assert (parked.consumer, parked.handler) == (name, "charge_v1")
    [again] = dead.list()
    assert (again.error_type, again.consumer, again.handler) == (
        "unknown_handler",
        name,
        "charge_v1",
    )

    dead.replay(again.id, to_handler=f"{name}:charge")
    drain(engine, [release_2.consumer], transport, fail_fast=False, idle_timeout=1.0)
    assert release_2.runs == {"charge": 1}
    assert dead.list() == []
