"""Error channels (``on_failure``): per handler, per consumer, named; before or instead of
the dead-letter store; their own transaction; compensating messages; their own failures."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer

from .models import Effect, OrderPlaced
from .test_consumer import Harness

SessionFactory = sessionmaker[outboxer.OutboxSession]
ONCE = outboxer.Retry(max_attempts=2, initial_delay=0.05, max_delay=0.05, jitter=0.0)

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)


@outboxer.message("test.payment_failed", destination="orders")
@dataclass
class PaymentFailed:
    order_id: int
    reason: str


@pytest.fixture
def h(engine: Engine, Session: SessionFactory) -> Harness:
    return Harness(engine, Session)


def inbox_handlers(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(outboxer.inbox.c.handler)).scalars())


def test_a_handlers_error_channel_gets_exactly_its_failures_and_the_dead_letter_follows(
    h: Harness,
) -> None:
    charged: list[outboxer.Failure] = []
    by_consumer: list[outboxer.Failure] = []

    def on_charge_failure(failure: outboxer.Failure, session: Session) -> None:
        charged.append(failure)
        session.add(Effect(handler="on_charge_failure", message_key=str(failure.event.order_id)))

    h.consumer = outboxer.Consumer(
        h.Session, name="billing", retry=ONCE, on_failure=by_consumer.append
    )

    @h.consumer.handler(OrderPlaced, on_failure=on_charge_failure)
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError(f"gateway down for {event.order_id}")

    @h.consumer.handler(OrderPlaced, retry=outboxer.Retry(retry_on=ConnectionError))
    def reserve(event: OrderPlaced) -> None:
        if event.order_id == 2:
            raise ValueError("no stock")

    @h.consumer.handler(OrderPlaced)
    def notify(event: OrderPlaced, session: Session) -> None:
        h.effect("notify", session, event.order_id)

    h.publish(OrderPlaced(order_id=1), OrderPlaced(order_id=2))
    h.deliver()

    assert sorted(f.event.order_id for f in charged) == [1, 2]
    assert {(f.handler, f.consumer, f.attempts, f.reason) for f in charged} == {
        ("charge", "billing", 2, "exhausted")
    }
    assert all(isinstance(f.error, ConnectionError) for f in charged)
    assert {f.message_id for f in charged} == {f.envelope.message_id for f in charged}
    # reserve's own failure (order 2, not retryable) reaches the consumer's channel only.
    assert [(f.handler, f.event.order_id, f.attempts, f.reason) for f in by_consumer] == [
        ("reserve", 2, 1, "non_retryable")
    ]
    assert h.effects() == {"on_charge_failure": 2, "notify": 2}
    # Before the dead-letter store (the default): every give-up is parked as well.
    assert sorted((d.handler, d.attempts) for d in h.dead()) == [
        ("charge", 2),
        ("charge", 2),
        ("reserve", 1),
    ]


def test_a_compensating_message_published_by_the_error_channel_is_delivered(
    h: Harness,
) -> None:
    compensations: list[tuple[PaymentFailed, str | None]] = []

    def compensate(failure: outboxer.Failure, session: Session) -> None:
        session.publish(PaymentFailed(order_id=failure.event.order_id, reason=str(failure.error)))

    @h.consumer.handler(OrderPlaced, retry=ONCE, on_failure=compensate)
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError("card declined")

    @h.consumer.handler(PaymentFailed)
    def release_stock(event: PaymentFailed, context: outboxer.Context) -> None:
        compensations.append((event, context.causation_id))

    h.publish(OrderPlaced(order_id=7))
    h.deliver()
    [letter] = h.dead()
    # Delivered once, and caused by the message that failed.
    assert compensations == [
        (PaymentFailed(order_id=7, reason="card declined"), str(letter.message_id))
    ]


def test_instead_of_the_dead_letter_the_channel_commits_with_the_inbox_row(h: Harness) -> None:
    seen: list[int] = []

    @h.consumer.error_channel("payments_errors", dead_letter=False)
    def payments_errors(failure: outboxer.Failure, session: Session) -> None:
        seen.append(failure.event.order_id)
        session.add(Effect(handler="payments_errors", message_key=str(failure.event.order_id)))

    @h.consumer.handler(OrderPlaced, retry=ONCE, on_failure="payments_errors")
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError("gateway down")

    h.publish(OrderPlaced(order_id=3))
    h.deliver()
    assert seen == [3]
    assert h.dead() == []
    assert inbox_handlers(h.engine) == ["billing:charge"]
    assert h.consumer.stats.error_channel == 1

    # The same message delivered again: the inbox row says it was handled; nothing reruns.
    with h.engine.begin() as conn:
        conn.execute(outboxer.outbox.delete())
    h.publish(OrderPlaced(order_id=3), message_id=str(_message_id(h.engine)))
    h.deliver()
    assert seen == [3]
    assert h.effects() == {"payments_errors": 1}


def _message_id(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(outboxer.inbox.c.message_id)).scalar_one()


@pytest.mark.parametrize("dead_letter", [True, False])
def test_a_failing_error_channel_rolls_back_and_the_message_is_still_dead_lettered(
    h: Harness, dead_letter: bool
) -> None:
    def broken(failure: outboxer.Failure, session: Session) -> None:
        session.add(Effect(handler="broken", message_key="x"))
        session.publish(PaymentFailed(order_id=1, reason="never sent"))
        raise RuntimeError("alerting service down")

    channel = outboxer.ErrorChannel(broken, dead_letter=dead_letter)

    @h.consumer.handler(OrderPlaced, retry=ONCE, on_failure=channel)
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError("gateway down")

    h.publish(OrderPlaced(order_id=1))
    h.deliver()
    [letter] = h.dead()
    assert letter.handler == "charge" and letter.attempts == 2
    assert "error channel broken raised: RuntimeError: alerting service down" in (
        letter.error_message
    )
    assert h.effects() == {}  # the channel's writes and its message were rolled back
    assert inbox_handlers(h.engine) == []
    # The replay still reaches the handler (no inbox row hides it).
    outboxer.DeadLetters(h.Session).replay(letter.id)
    h.deliver()
    assert len(h.dead()) == 1


def test_the_handlers_channel_wins_over_the_consumers(h: Harness) -> None:
    calls: list[str] = []
    h.consumer = outboxer.Consumer(
        h.Session, name="billing", retry=ONCE, on_failure=lambda f: calls.append("consumer")
    )

    @h.consumer.handler(OrderPlaced, on_failure=lambda f: calls.append("handler"))
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError("down")

    h.publish(OrderPlaced(order_id=1))
    h.deliver()
    assert calls == ["handler"]


def test_error_channel_mistakes_raise_at_registration(Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="billing")
    with pytest.raises(
        outboxer.ConfigurationError,
        match=r"no error channel named 'alerts'.*"
        r"@consumer.error_channel\('alerts'\)",
    ):

        @consumer.handler(OrderPlaced, on_failure="alerts")
        def charge(event: OrderPlaced) -> None: ...

    named = outboxer.Consumer(Session, name="shipping", on_failure="alerts")
    with pytest.raises(outboxer.ConfigurationError, match="no error channel named 'alerts'"):

        @named.handler(OrderPlaced)
        def ship(event: OrderPlaced) -> None: ...

    async def async_alert(failure: outboxer.Failure) -> None: ...

    with pytest.raises(outboxer.ConfigurationError, match=r"async def.*make it 'def'"):
        outboxer.Consumer(Session, name="x", on_failure=async_alert)
    with pytest.raises(outboxer.ConfigurationError, match="outboxer cannot supply"):
        outboxer.ErrorChannel(lambda failure, pager: None)
    with pytest.raises(outboxer.ConfigurationError, match="first positional parameter"):
        outboxer.ErrorChannel(lambda: None)
    with pytest.raises(outboxer.ConfigurationError, match="on_failure must be a function"):
        outboxer.Consumer(Session, name="x", on_failure=42)  # type: ignore[arg-type]
    with pytest.raises(outboxer.ConfigurationError, match="dead_letter"):
        outboxer.ErrorChannel(print, dead_letter="no")  # type: ignore[arg-type]

    @consumer.error_channel("alerts")
    def alerts(failure: outboxer.Failure) -> None: ...

    with pytest.raises(outboxer.ConfigurationError, match="already has an error channel"):
        consumer.error_channel("alerts")(alerts)


@pytest.fixture
def default_channel() -> Iterator[list[outboxer.Failure]]:
    """A process-wide default channel for one test, removed after it."""
    seen: list[outboxer.Failure] = []

    def report(failure: outboxer.Failure, session: Session) -> None:
        seen.append(failure)
        session.add(Effect(handler="default", message_key=failure.handler))

    outboxer.set_default_on_failure(report)
    try:
        yield seen
    finally:
        outboxer.set_default_on_failure(None)


def test_the_process_wide_default_serves_handlers_that_name_no_channel(
    h: Harness, default_channel: list[outboxer.Failure]
) -> None:
    own: list[str] = []

    @h.consumer.handler(OrderPlaced, retry=ONCE)
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError("down")

    @h.consumer.handler(OrderPlaced, retry=ONCE, on_failure=lambda f: own.append(f.handler))
    def ship(event: OrderPlaced) -> None:
        raise ConnectionError("down")

    h.publish(OrderPlaced(order_id=1))
    h.deliver()
    assert [f.handler for f in default_channel] == ["charge"]
    assert own == ["ship"]
    assert h.effects() == {"default": 1}  # in the channel's transaction
    assert len(h.dead()) == 2


def test_the_default_must_be_a_plain_function(db_kind: str) -> None:
    async def report(failure: outboxer.Failure) -> None: ...

    with pytest.raises(outboxer.ConfigurationError, match="make it a plain def"):
        outboxer.set_default_on_failure(report)
    with pytest.raises(outboxer.ConfigurationError, match="takes a function"):
        outboxer.set_default_on_failure("alerts")  # type: ignore[arg-type]


# Found by a review on 2026-11-30: each failed before its fix --------------------------------


class _AsyncPager:
    __name__ = "pager"

    async def __call__(self, failure: outboxer.Failure, session: Session) -> None:
        session.add(Effect(handler="pager", message_key=str(failure.event.order_id)))


def test_an_async_callable_channel_is_refused_on_a_sync_consumer(Session: SessionFactory) -> None:
    """Before: accepted; the coroutine was never awaited, and with ``dead_letter=False`` the
    message counted as handled while the channel's work never happened."""
    consumer = outboxer.Consumer(Session, name="billing")
    with pytest.raises(outboxer.ConfigurationError, match="async"):

        @consumer.handler(
            OrderPlaced, on_failure=outboxer.ErrorChannel(_AsyncPager(), dead_letter=False)
        )
        def charge(event: OrderPlaced) -> None:
            raise ConnectionError("gateway down")


def test_an_error_channel_that_commits_is_refused_and_its_work_rolled_back(
    h: Harness,
) -> None:
    """Before: the channel's commit went through (its compensation was sent), and the dead
    letter beside it said the channel "could not be committed": a replay ran it again."""

    def compensate(failure: outboxer.Failure, session: outboxer.OutboxSession) -> None:
        session.publish(PaymentFailed(order_id=failure.event.order_id, reason="declined"))
        session.commit()

    @h.consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=1), on_failure=compensate)
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError("card declined")

    h.publish(OrderPlaced(order_id=7))
    h.deliver()
    [letter] = h.dead()
    assert "error channel compensate raised" in letter.error_message
    assert "session.commit()" in letter.error_message
    with h.engine.connect() as conn:  # nothing of the channel's transaction committed
        assert conn.execute(select(outboxer.outbox.c.message_type)).all() == []
    assert h.relay.run(once=True).sent == 0
