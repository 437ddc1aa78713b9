"""Handlers that break their side of the call in ways the guard did not see (a review of
2026-11-30): each scenario runs one message at a time and batched, on each database, and
expects the same. Every test here failed before its fix; the failure is in its docstring.
"""

from __future__ import annotations

import asyncio
import functools
import json
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, Session, sessionmaker

import outboxer
from outboxer.errors import ConfigurationError

from .consumer_line import POISON, Line, envelope_of
from .models import Effect, OrderPlaced

ONCE = outboxer.Retry(max_attempts=1)


# A sync handler that returns a coroutine ---------------------------------------------------


async def _reserve_later(event: OrderPlaced, session: Session) -> None:
    session.add(Effect(handler="reserve", message_key=str(event.order_id)))


def _logged(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A plain logging decorator, as an application writes one."""

    @functools.wraps(fn)
    def wrapper(event: OrderPlaced, session: Session) -> Any:
        return fn(event, session)

    return wrapper


class _AsyncCallable:
    __name__ = "reserve"

    async def __call__(self, event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "handler",
    [_AsyncCallable(), functools.partial(_reserve_later)],
    ids=["async-call", "partial"],
)
def test_an_async_handler_in_disguise_is_refused_on_a_sync_consumer(
    Session: sessionmaker[outboxer.OutboxSession], handler: Callable[..., Any]
) -> None:
    """Before: registered as a sync handler; the coroutine it returned was never awaited,
    the message counted as processed, its inbox row committed, and the effect never
    happened."""
    consumer = outboxer.Consumer(Session, name="billing")
    with pytest.raises(ConfigurationError, match="async def"):
        consumer.handler(OrderPlaced, name="reserve")(handler)


def _bridged(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """A sync bridge around an async function (as asgiref's ``async_to_sync``): it runs the
    coroutine to the end itself."""

    @functools.wraps(fn)
    def bridge(event: OrderPlaced, session: Session) -> None:
        asyncio.run(fn(event, session))

    return bridge


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_decorator_around_an_async_def_decides_at_run_time(line: Line) -> None:
    """A plain def wrapping an async def is either kind: a bridge that runs the coroutine
    itself is a sync handler (found attacking the first fix, which refused it at
    registration); a logging decorator that returns the coroutine fails at run time, dead-
    lettered at once, as a plain def that returns one does (the test above)."""
    line.consumer.handler(OrderPlaced, name="reserve", retry=ONCE)(_bridged(_reserve_later))
    line.consumer.handler(OrderPlaced, name="logged", retry=ONCE)(_logged(_reserve_later))
    line.inject(envelope_of(OrderPlaced(order_id=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
        line.deliver(until=lambda: bool(line.dead()))
    assert line.effects() == {"1": 1}  # the bridge's; the logged one's never ran
    [dead] = line.dead()
    assert (dead.handler, dead.error_type) == ("logged", "outboxer.errors.HandlerMisuse")


def test_a_sync_handler_returning_a_coroutine_is_dead_lettered_not_processed(
    line: Line,
) -> None:
    """A plain def that hands back a coroutine (no decorator to unwrap): the run fails and
    the message is dead-lettered at once, its inbox row rolled back; the coroutine is
    closed, not left for a "never awaited" warning. Before: processed, with no effect."""

    def reserve(event: OrderPlaced, session: Session) -> Coroutine[Any, Any, None]:
        line.calls[event.order_id] += 1
        if event.order_id == POISON:
            return _reserve_later(event, session)
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        return None  # type: ignore[return-value]

    line.consumer.handler(OrderPlaced, name="reserve", retry=ONCE)(reserve)
    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
        line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    assert json.loads(dead.payload)["order_id"] == POISON
    assert dead.error_type == "outboxer.errors.HandlerMisuse"
    assert "async def" in dead.error_message
    assert line.calls[POISON] == 1  # not retried: every run would do the same
    assert line.effects() == {str(i): 1 for i in range(10) if i != POISON}
    assert line.consume().messages == 0


# A handler that ends outboxer's transaction through another door -----------------------

ENDINGS: dict[str, Callable[[Session], object]] = {
    "reset": lambda s: s.reset(),
    "invalidate": lambda s: s.invalidate(),
    "transaction-rollback": lambda s: s.get_transaction().rollback(),  # type: ignore[union-attr]
    "transaction-close": lambda s: s.get_transaction().close(),  # type: ignore[union-attr]
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_handler_that_ends_its_transaction_is_refused_and_loses_nothing(
    line: Line, ending: str
) -> None:
    """Before: ``session.reset()``, ``session.invalidate()`` or ``get_transaction()
    .rollback()/.close()`` threw away the handler's work and its inbox row while the
    message counted as processed (acknowledged, no effect, no dead letter)."""

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls[event.order_id] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        session.flush()
        if event.order_id == POISON:
            ENDINGS[ending](session)

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    assert json.loads(dead.payload)["order_id"] == POISON
    assert dead.error_type == "outboxer.errors.HandlerSessionError"
    assert line.calls[POISON] == 1
    assert line.effects() == {str(i): 1 for i in range(10) if i != POISON}
    assert line.consume().messages == 0


# Batching: what a handler sees, and whom a late write blames ------------------------------


def test_a_handler_sees_the_writes_of_the_messages_before_it_through_core(line: Line) -> None:
    """A handler that checks with a Core query before adding: one at a time, the first
    message's row is committed when the second runs. Before: batched, the adds were still
    pending in the session (the Core query does not autoflush) and all five wrote it."""

    @line.consumer.handler(OrderPlaced)
    def welcome(event: OrderPlaced, session: Session) -> None:
        key = f"first-order-of-{event.customer}"
        found = session.connection().execute(
            text("SELECT 1 FROM test_effects WHERE message_key = :k"), {"k": key}
        )
        if found.first() is None:
            session.add(Effect(handler="welcome", message_key=key))

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(5)))
    assert line.consume().processed == 5
    assert line.effects() == {"first-order-of-ada": 1}


def test_a_session_without_autoflush_sees_the_writes_of_the_messages_before_it(
    line: Line, engine: Engine
) -> None:
    """The same with an ORM query on a session made with ``autoflush=False``."""
    line.consumer.session_factory = sessionmaker(
        engine, class_=outboxer.OutboxSession, autoflush=False
    )

    @line.consumer.handler(OrderPlaced)
    def welcome(event: OrderPlaced, session: Session) -> None:
        key = f"first-order-of-{event.customer}"
        if session.query(Effect).filter_by(message_key=key).first() is None:
            session.add(Effect(handler="welcome", message_key=key))

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(5)))
    assert line.consume().processed == 5
    assert line.effects() == {"first-order-of-ada": 1}


@pytest.fixture
def invalid_effect_5() -> Iterator[None]:
    """A mapper event that refuses message 5's effect row when it is flushed."""

    def refuse(_mapper: Mapper[Any], _connection: Connection, target: Effect) -> None:
        if target.message_key == str(POISON):
            raise ValueError("the effect of order 5 is invalid")

    event.listen(Effect, "before_insert", refuse)
    yield
    event.remove(Effect, "before_insert", refuse)


@pytest.mark.usefixtures("invalid_effect_5")
def test_a_plain_error_from_a_late_write_is_blamed_on_its_own_message(line: Line) -> None:
    """Message 5's row fails when flushed, by a plain exception (not a database error).
    Before: batched, the row was flushed by message 6's query, and message 6 was
    dead-lettered beside 5, its effect lost, although alone it succeeds."""

    @line.consumer.handler(OrderPlaced, retry=ONCE)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.get(Effect, -event.order_id)  # any query: autoflushes what is pending
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(1, 10)))
    line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    assert json.loads(dead.payload)["order_id"] == POISON
    assert line.effects() == {str(i): 1 for i in range(1, 10) if i != POISON}
    assert line.consume().messages == 0
