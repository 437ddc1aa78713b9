"""A consumer application whose handler fails before it succeeds, for tests that run
``outboxer-inbox`` alone (its own relay sends the retries and replays).

Configured by the environment: ``APP_DB`` (database URL), ``APP_DESTINATION`` (where
``OrderPlaced`` is published), ``APP_CONSUMER`` (the consumer's and its queue's name) and
``APP_FIXED`` (a file: until it exists, orders with an even id fail at every attempt).
Odd orders fail at their first attempt only, so their delayed retry succeeds.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer

from .models import Effect, OrderPlaced

engine = create_engine(os.environ["APP_DB"], pool_pre_ping=True)
consumer = outboxer.Consumer(
    sessionmaker(engine, class_=outboxer.OutboxSession),
    name=os.environ["APP_CONSUMER"],
    retry=outboxer.Retry(max_attempts=2, initial_delay=0.3, max_delay=0.3, jitter=0.0),
)


@consumer.handler(OrderPlaced, destination=os.environ["APP_DESTINATION"])
def charge(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
    if event.order_id % 2 and context.attempt == 1:
        raise ConnectionError(f"order {event.order_id}: the payment gateway timed out")
    if event.order_id % 2 == 0 and not Path(os.environ["APP_FIXED"]).exists():
        raise ValueError(f"order {event.order_id}: card declined")
    session.add(Effect(handler="charge", message_key=str(event.order_id)))
