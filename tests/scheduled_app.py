"""A consumer with a scheduled handler, for tests that run several ``outboxer-inbox``
processes: each run of a tick writes an Effect row (``tick``, the tick's number) and
publishes an OrderPlaced whose order id is the tick's number.

Configured by the environment: ``APP_DB``, ``APP_DESTINATION`` (where its message
handler's OrderPlaced come from, and where the tick publishes), ``APP_CONSUMER``.
"""

from __future__ import annotations

import os
from datetime import timedelta

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer

from .models import Effect, OrderPlaced

engine = create_engine(os.environ["APP_DB"], pool_pre_ping=True)
consumer = outboxer.Consumer(
    sessionmaker(engine, class_=outboxer.OutboxSession), name=os.environ["APP_CONSUMER"]
)


@consumer.handler(OrderPlaced, destination=os.environ["APP_DESTINATION"])
def reserve(event: OrderPlaced) -> None:
    pass


@consumer.scheduled(every=timedelta(seconds=1))
def tick(session: Session, context: outboxer.Tick) -> None:
    session.add(Effect(handler="tick", message_key=str(context.number)))
    session.publish(OrderPlaced(order_id=context.number), destination="scheduled-elsewhere")
