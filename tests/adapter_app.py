"""An application with an inbound adapter, for tests that run ``outboxer-inbox`` on it.

Configured by the environment: ``APP_DB`` (database URL), ``APP_CONSUMER`` (the
consumer's name), ``APP_QUEUE`` (the other system's queue the adapter reads) and
``APP_FIXED`` (a file: once it exists, the handler takes negative amounts too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer

from .models import Effect

engine = create_engine(os.environ["APP_DB"], pool_pre_ping=True)
consumer = outboxer.Consumer(
    sessionmaker(engine, class_=outboxer.OutboxSession), name=os.environ["APP_CONSUMER"]
)


@outboxer.message("test.adapter_app.payment")
@dataclass
class Payment:
    payment_id: str
    amount_cents: int


@consumer.adapter(
    Payment, queue=os.environ["APP_QUEUE"], message_id=outboxer.from_header("x-webhook-id")
)
def record(event: Payment, session: Session) -> None:
    if event.amount_cents < 0 and not Path(os.environ["APP_FIXED"]).exists():
        raise ValueError(f"payment {event.payment_id} has a negative amount")
    session.add(Effect(handler="record", message_key=event.payment_id))
