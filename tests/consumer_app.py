"""A consumer application for tests that run ``outboxer-inbox`` as separate processes.

Configured by the environment: ``APP_DB`` (database URL), ``APP_DESTINATION`` (where
``OrderPlaced`` is published), ``APP_CONSUMER`` (the consumer's and its queue's name).
"""

from __future__ import annotations

import os

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer

from .models import Effect, OrderPlaced

engine = create_engine(os.environ["APP_DB"], pool_pre_ping=True)
consumer = outboxer.Consumer(
    sessionmaker(engine, class_=outboxer.OutboxSession), name=os.environ["APP_CONSUMER"]
)


@consumer.handler(OrderPlaced, destination=os.environ["APP_DESTINATION"])
def reserve(event: OrderPlaced, session: Session) -> None:
    session.add(Effect(handler="reserve", message_key=str(event.order_id)))
