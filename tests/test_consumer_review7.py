"""Review 7 (2026-11-30): unusual but legal handler behaviour, batched (the default) and
one message at a time, on each database. Every test here failed before its fix; the
failure is in its docstring."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer import wire
from outboxer.batching import Batcher
from outboxer.errors import ConfigurationError
from outboxer.instrumentation import TransportDescription
from outboxer.message import Envelope
from outboxer.transports.base import Delivery

from .broker_rabbitmq import RabbitMQCase
from .consumer_line import POISON, Line, envelope_of
from .models import Effect, Order, OrderPlaced
from .services import async_url
from .test_consumer import RefundRequested
from .test_consumer_hostile import Running, dead, effects, subscribed, wait_until

ONCE = outboxer.Retry(max_attempts=1)


def run_until(line: Line, until: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run the consumer (not ``once``: a message given back forever must fail the test, not
    hang it) until ``until()`` holds; the run must end cleanly."""
    line.transport.receiver(line.consumer.subscription())
    errors: list[BaseException] = []

    def target() -> None:
        try:
            line.consumer.run(line.transport, idle_timeout=0.05)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not until():
            assert time.monotonic() < deadline, "the expected state was not reached in time"
            assert thread.is_alive(), f"the consumer died: {errors!r}"
            time.sleep(0.02)
    finally:
        line.consumer.stop()
        thread.join(15)
    assert not thread.is_alive() and not errors, errors


# An exception whose text cannot be read --------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_a_handler_error_whose_str_raises_is_dead_lettered_not_redelivered_forever(
    line: Line, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: writing its dead letter (and its log line) read ``str(error)``, which raised
    out of processing; the delivery was given back, came again, failed again: the consumer
    looped on it for ever (``run(once=True)`` never returned), the rest of its batch
    rolled back each time."""

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        if event.order_id == POISON:
            raise Unprintable()

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    run_until(line, lambda: bool(line.dead()) and len(line.effects()) == 9)
    [dead] = line.dead()
    assert dead.error_type.endswith("Unprintable")
    assert "its text could not be read" in dead.error_message
    assert line.effects() == {str(i): 1 for i in range(10) if i != POISON}
    assert line.broker.queue_depth("billing") == 0
    assert line.consumer.stats.failed_deliveries == 0


# A handler that ends the transaction with a statement -------------------------------------

CONTROL = ["COMMIT", "/* done */ commit", "ROLLBACK", "START TRANSACTION"]


@pytest.mark.parametrize("statement", CONTROL)
def test_a_handler_that_sends_commit_as_sql_is_refused_and_loses_no_other_message(
    line: Line, statement: str
) -> None:
    """Before (batched, every database): message 2's ``session.execute(text("COMMIT"))``
    committed the inbox rows of all ten messages; message 5 then failed, the rollback took
    the writes of messages 3 to 9 with it, and one at a time they were duplicates: six
    messages acknowledged with no effect."""

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls[event.order_id] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        session.flush()
        if event.order_id == 2:
            session.execute(text(statement))
        if event.order_id == POISON:
            raise KeyError("no such order")

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    line.deliver(until=lambda: bool(line.dead()))
    letters = {json.loads(d.payload)["order_id"]: d for d in line.dead()}
    assert sorted(letters) == [2, POISON]
    assert letters[2].error_type == "outboxer.errors.HandlerSessionError"
    assert "ends its transaction" in letters[2].error_message
    assert line.effects() == {str(i): 1 for i in range(10) if i not in (2, POISON)}
    assert line.consume().messages == 0


def test_savepoints_stay_allowed(line: Line) -> None:
    """``session.begin_nested()`` sends SAVEPOINT, RELEASE and ROLLBACK TO SAVEPOINT: a
    handler that inserts or ignores a duplicate that way keeps working, batched too."""

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        try:
            with session.begin_nested():
                session.add(Order(id=1 + event.order_id % 3))
        except IntegrityError:
            pass
        nested = session.begin_nested()  # left open: outboxer's commit releases it
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        assert nested.is_active

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(1, 10)))
    line.deliver(until=lambda: len(line.effects()) == 9)
    assert line.dead() == []
    assert line.effects() == {str(i): 1 for i in range(1, 10)}
    with line.engine.connect() as conn:
        assert sorted(conn.execute(select(Order.id)).scalars()) == [1, 2, 3]


# A handler that throws away what the session holds ---------------------------------------

DISCARDS: dict[str, Callable[[Session, Order], object]] = {
    "expunge_all": lambda s, _: s.expunge_all(),
    "expire_all": lambda s, _: s.expire_all(),
    "refresh": lambda s, order: s.refresh(order),
    "expire": lambda s, order: s.expire(order),
}


@pytest.mark.parametrize("discard", sorted(DISCARDS))
def test_a_handler_that_clears_the_session_keeps_the_earlier_messages_writes(
    line: Line, discard: str
) -> None:
    """Before (batched, every database): each handler's ``expunge_all()`` or
    ``expire_all()`` threw away the earlier messages' pending writes (and ``refresh()`` /
    ``expire()`` the earlier message's change to a shared row), while their inbox rows
    committed: every message acknowledged, the writes of all but the last lost."""
    with line.Session.begin() as session:
        session.add_all([Order(id=i, customer="") for i in range(1, 11)])
        session.add(Order(id=100, customer=""))

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        shared = session.get(Order, 100)
        assert shared is not None
        DISCARDS[discard](session, shared)
        order = session.get(Order, event.order_id)
        assert order is not None
        order.customer = f"c{event.order_id}"
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        shared = session.get(Order, 100)
        assert shared is not None
        shared.customer += str(event.order_id % 10)

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(1, 11)))
    line.deliver(until=lambda: len(line.effects()) == 10)
    with line.engine.connect() as conn:
        customers = dict(conn.execute(select(Order.id, Order.customer)).all())
    assert customers == {**{i: f"c{i}" for i in range(1, 11)}, 100: "1234567890"}
    assert line.effects() == {str(i): 1 for i in range(1, 11)}
    assert line.dead() == []


# A handler with a yield in it ------------------------------------------------------------


def test_a_generator_handler_is_refused_at_registration() -> None:
    """Before: registered; each message counted as processed and acknowledged, while the
    handler's body never ran (calling a generator function runs nothing)."""
    consumer = outboxer.Consumer(sessionmaker(class_=outboxer.OutboxSession), name="billing")

    def reserve(event: OrderPlaced, session: Session) -> Iterator[None]:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        yield None

    with pytest.raises(ConfigurationError, match="generator function"):
        consumer.handler(OrderPlaced)(reserve)


def test_a_handler_that_returns_a_generator_is_dead_lettered_not_processed(line: Line) -> None:
    """A decorator around a generator function hides it from registration: the run
    returns a generator, and fails. Before: processed, with no effect."""

    def writes(event: OrderPlaced, session: Session) -> Iterator[None]:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        yield None

    def reserve(event: OrderPlaced, session: Session) -> Any:
        if event.order_id == POISON:
            return writes(event, session)
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        return None

    line.consumer.handler(OrderPlaced, retry=ONCE)(reserve)
    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    assert json.loads(dead.payload)["order_id"] == POISON
    assert dead.error_type == "outboxer.errors.HandlerMisuse"
    assert "yield" in dead.error_message
    assert line.effects() == {str(i): 1 for i in range(10) if i != POISON}
    assert line.consume().messages == 0


# A handler that changes its event --------------------------------------------------------


def test_what_a_handler_changes_in_its_event_stays_its_own(line: Line) -> None:
    """Two handlers of one message type, and a retry at once in process: before, they were
    all given one decoded object, so the first handler's change (made in a run that then
    failed and was rolled back) reached its retry and the other handler: ``charge`` saw
    "ADA1" in its second run, and ``ship`` wrote "ADA1" for "ada1"."""
    seen: list[tuple[str, int, str]] = []
    failed: set[int] = set()

    @line.consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=2, instant=1))
    def charge(event: OrderPlaced, session: Session) -> None:
        seen.append(("charge", event.order_id, event.customer))
        event.customer = event.customer.upper()  # "normalised" in place
        if event.order_id not in failed:
            failed.add(event.order_id)
            raise ConnectionError("gateway timed out")
        session.add(Effect(handler="charge", message_key=event.customer))

    @line.consumer.handler(OrderPlaced)
    def ship(event: OrderPlaced, session: Session) -> None:
        seen.append(("ship", event.order_id, event.customer))
        session.add(Effect(handler="ship", message_key=event.customer))

    line.inject(*(envelope_of(OrderPlaced(order_id=i, customer=f"ada{i}")) for i in range(3)))
    assert line.consume().messages == 3
    assert sorted(seen) == sorted(
        (name, i, f"ada{i}") for i in range(3) for name in ("charge", "charge", "ship")
    )
    assert line.effects() == {
        **{f"ADA{i}": 1 for i in range(3)},
        **{f"ada{i}": 1 for i in range(3)},
    }


# Two consumers with the same name, receiving the same messages at once -------------------


class _Held(Delivery):
    def __init__(self, envelope: Envelope) -> None:
        self.body = envelope.payload
        self.headers = wire.encode_headers(envelope)
        self.destination = "orders"

    def ack(self) -> None:
        pass

    def release(self) -> None:
        pass


def test_two_consumers_batching_the_same_messages_at_once_apply_each_once(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession]
) -> None:
    """Two processes of one consumer get the same ten messages (a relay published them
    twice), in opposite orders, each batch with a redelivered copy of its first message:
    each effect happens once, every delivery is settled (none given back), nothing is
    dead-lettered."""
    envelopes = [envelope_of(OrderPlaced(order_id=i)) for i in range(10)]
    deliveries = [_Held(envelope) for envelope in envelopes]
    orders = [deliveries + deliveries[:1], deliveries[::-1] + deliveries[-1:]]
    barrier = threading.Barrier(2)
    outcomes: list[list[Any]] = [[], []]

    def process(index: int) -> None:
        consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)

        @consumer.handler(OrderPlaced)
        def reserve(event: OrderPlaced, session: Session) -> None:
            session.add(Effect(handler="reserve", message_key=str(event.order_id)))
            session.flush()
            time.sleep(0.005)  # widen the window the two transactions overlap in

        batcher = Batcher(consumer.processor(), TransportDescription("memory"))
        barrier.wait(10)
        outcomes[index] = batcher.process(orders[index])

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    reports = [o for both in outcomes for o in both]
    assert len(reports) == 22
    assert all(isinstance(o, outboxer.MessageReport) for o in reports), reports
    outcome_counts = Counter(o.outcomes["reserve"] for o in reports)
    assert outcome_counts == {"processed": 10, "duplicate": 12}
    with engine.connect() as conn:
        effects = Counter(conn.execute(select(Effect.message_key)).scalars())
    assert effects == {str(i): 1 for i in range(10)}
    assert outboxer.DeadLetters(Session).list() == []


# A handler that publishes, then fails ----------------------------------------------------


def test_what_a_failing_handler_published_is_dropped_and_the_others_are_stored_once(
    line: Line,
) -> None:
    """Batched, the batch with the failing message rolls back and runs one at a time: the
    failing run's message is dropped with it, every other message's is stored once."""

    @line.consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=2, instant=1))
    def reserve(event: OrderPlaced, session: outboxer.OutboxSession) -> None:
        session.publish(RefundRequested(order_id=event.order_id))
        session.flush()
        if event.order_id == POISON:
            raise ConnectionError("gateway timed out")

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    line.deliver(until=lambda: bool(line.dead()))
    with line.engine.connect() as conn:
        rows = conn.execute(select(outboxer.outbox.c.payload, outboxer.outbox.c.message_type)).all()
    published = Counter(
        json.loads(payload)["order_id"] for payload, type_ in rows if type_ != "test.order_placed"
    )
    assert published == {i: 1 for i in range(10) if i != POISON}


def test_a_flush_error_a_handler_handled_blames_nobody_else(line: Line) -> None:
    """Message 3's handler inserts a row that is there already, in a savepoint, and goes on
    (insert or ignore). Message 7's handler then fails on its own: its failed batch run is
    its first run, as for any message whose handler raised. Before: the handled flush error
    made the batch blame nobody, and message 7's handler ran twice though it may run once."""
    with line.Session.begin() as session:
        session.add(Order(id=3))

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls[event.order_id] += 1
        if event.order_id == 3:
            try:
                with session.begin_nested():
                    session.add(Order(id=3))
            except IntegrityError:
                pass
        if event.order_id == 7:
            raise KeyError("no such order")
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(1, 10)))
    line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    assert (json.loads(dead.payload)["order_id"], dead.attempts) == (7, 1)
    assert line.calls[7] == 1
    assert line.effects() == {str(i): 1 for i in range(1, 10) if i != 7}


# The same, with async handlers -----------------------------------------------------------


@pytest.fixture
async def AsyncSession(
    engine: Engine, db_url: str
) -> AsyncIterator[async_sessionmaker[outboxer.AsyncOutboxSession]]:
    async_engine = create_async_engine(async_url(db_url))
    yield async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession)
    await async_engine.dispose()


async def test_async_handlers_get_the_same_protections(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    """Async handlers: ``COMMIT`` as SQL is refused, an error whose text cannot be read is
    dead-lettered, a change to the event does not reach the retry or the other handler,
    and an ``async def`` with a yield in it is refused at registration."""
    consumer = outboxer.Consumer(AsyncSession, name="billing", retry=ONCE)
    seen: list[str] = []

    @consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=2, instant=1))
    async def reserve(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
        seen.append(event.customer)
        event.customer = event.customer.upper()
        if len(seen) == 1:
            raise ConnectionError("gateway timed out")
        if event.order_id == 2:
            await session.execute(text("COMMIT"))
        if event.order_id == 3:
            raise Unprintable()
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    @consumer.handler(OrderPlaced)
    async def ship(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
        seen.append(f"ship {event.customer}")

    async def generator(event: OrderPlaced) -> AsyncIterator[None]:
        yield None

    with pytest.raises(ConfigurationError, match="generator function"):
        consumer.handler(OrderPlaced, name="generator")(generator)
    for i in (1, 2, 3):
        envelope = envelope_of(OrderPlaced(order_id=i))
        await consumer.process_async(envelope.payload, wire.encode_headers(envelope))
    # 1: fails, retried at once; 2: refused, not retried; 3: fails twice.
    assert seen == ["ada", "ada", "ship ada", "ada", "ship ada", "ada", "ada", "ship ada"]
    letters = {json.loads(d.payload)["order_id"]: d for d in outboxer.DeadLetters(Session).list()}
    assert sorted(letters) == [2, 3]
    assert letters[2].error_type == "outboxer.errors.HandlerSessionError"
    assert "its text could not be read" in letters[3].error_message
    with engine.connect() as conn:
        assert list(conn.execute(select(Effect.message_key)).scalars()) == ["1"]


def test_a_handler_that_swallows_a_flush_error_is_told_so_in_its_dead_letter(line: Line) -> None:
    """Catching an IntegrityError outside a savepoint leaves a transaction that can only
    roll back. Before: the dead letter said the handler had ended the transaction "with
    session.reset(), session.invalidate(), or a rollback or close", which it never did."""
    with line.Session.begin() as session:
        session.add(Order(id=POISON))

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        try:
            session.add(Order(id=event.order_id))
            session.flush()
        except IntegrityError:
            pass  # "already there": but the transaction is lost

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(1, 10)))
    line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    assert json.loads(dead.payload)["order_id"] == POISON
    assert dead.error_type == "outboxer.errors.HandlerSessionError"
    assert "caught an error from a flush" in dead.error_message
    assert "IntegrityError" in dead.error_message
    assert line.effects() == {str(i): 1 for i in range(1, 10) if i != POISON}


# All of it at once, through RabbitMQ -----------------------------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_hostile_handlers_in_one_rabbitmq_batch_lose_nothing_and_the_consumer_lives(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    rabbitmq_case: RabbitMQCase,
) -> None:
    """Thirty messages in batches from RabbitMQ: one handler run sends COMMIT, one raises an
    error that cannot be printed, one returns a generator, and every run clears the
    session; the other twenty-seven apply once, the three are dead-lettered once, every
    delivery is acknowledged, the consumer keeps running."""
    consumer = outboxer.Consumer(Session, name=rabbitmq_case.unique("review7"), retry=ONCE)
    destination = rabbitmq_case.new_destination()
    hostile = {3: "commit", 13: "unprintable", 23: "generator"}

    def nothing(event: OrderPlaced) -> Iterator[None]:
        yield None

    @consumer.handler(OrderPlaced, destination=destination)
    def reserve(event: OrderPlaced, session: Session) -> Any:
        session.expunge_all()
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        what = hostile.get(event.order_id)
        if what == "commit":
            session.execute(text("COMMIT"))
        elif what == "unprintable":
            raise Unprintable()
        elif what == "generator":
            return nothing(event)
        return None

    subscribed(rabbitmq_case, consumer)
    with Session.begin() as session:
        for i in range(30):
            session.publish(OrderPlaced(order_id=i), destination=destination)
    outboxer.Relay(engine, rabbitmq_case.transport).run(once=True)
    with Running(consumer, rabbitmq_case.transport, concurrency=2):
        wait_until(lambda: len(dead(Session)) == 3, 20, "three dead letters")
        wait_until(lambda: len(effects(engine)) == 27, 20, "27 effects")
    assert consumer.stats.messages == 30
    letters = {json.loads(d.payload)["order_id"]: d.error_type for d in dead(Session)}
    assert letters == {
        3: "outboxer.errors.HandlerSessionError",
        13: f"{__name__}.Unprintable",
        23: "outboxer.errors.HandlerMisuse",
    }
    assert effects(engine) == {str(i): 1 for i in range(30) if i not in hostile}
    assert consumer.stats.failed_deliveries == 0
