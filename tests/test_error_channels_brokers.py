"""Error channels end to end through RabbitMQ, SQS and SNS on PostgreSQL: a handler's
channel gets exactly that handler's failures (after a delayed retry that travelled
through the broker), and the compensating message it publishes is delivered."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy.orm import Session

import outboxer

from .models import OrderPlaced
from .test_consumer_brokers import Line, case, line
from .test_error_channels import PaymentFailed

__all__ = ["case", "line"]  # the fixtures, shared with tests/test_consumer_brokers.py

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)

ONE_RETRY = outboxer.Retry(max_retries=1, initial_delay=0.05, max_delay=0.05, jitter=0.0)


def test_a_handlers_error_channel_gets_its_failures_and_its_compensation_is_delivered(
    line: Line,
) -> None:
    charge_failures: list[tuple[int, str, int]] = []
    consumer_failures: list[tuple[int, str, int]] = []
    released: Counter[int] = Counter()

    def on_charge_failure(failure: outboxer.Failure, session: Session) -> None:
        charge_failures.append((failure.event.order_id, failure.handler, failure.attempts))
        session.publish(
            PaymentFailed(order_id=failure.event.order_id, reason=str(failure.error)),
            destination=line.destination,
        )

    line.consumer = outboxer.Consumer(
        line.Session,
        name=line.name,
        retry=ONE_RETRY,
        on_failure=lambda f: consumer_failures.append((f.event.order_id, f.handler, f.attempts)),
    )

    @line.handler(on_failure=on_charge_failure)
    def charge(event: OrderPlaced) -> None:
        raise ConnectionError(f"card of order {event.order_id} declined")

    @line.handler(retry=outboxer.Retry(retry_on=ConnectionError))
    def reserve(event: OrderPlaced) -> None:
        if event.order_id == 2:
            raise ValueError("out of stock")

    @line.handler()
    def notify(event: OrderPlaced) -> None:
        pass

    @line.consumer.handler(PaymentFailed, destination=line.destination)
    def release_stock(event: PaymentFailed) -> None:
        released[event.order_id] += 1

    line.subscribe()
    line.publish(OrderPlaced(order_id=1), OrderPlaced(order_id=2))
    line.deliver(until=lambda: sum(released.values()) == 2 and bool(consumer_failures))
    line.quiet()

    # charge ran twice on each order (the retry came back through the broker), then gave up.
    assert sorted(charge_failures) == [(1, "charge", 2), (2, "charge", 2)]
    assert consumer_failures == [(2, "reserve", 1)]
    assert released == {1: 1, 2: 1}
    assert sorted((d.handler, d.attempts) for d in line.dead()) == [
        ("charge", 2),
        ("charge", 2),
        ("reserve", 1),
    ]
