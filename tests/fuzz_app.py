"""The consumer the hostile-input fuzz test runs as an ``outboxer-inbox`` process.

Configured by the environment: ``APP_DB``, ``APP_DESTINATION``, ``APP_CONSUMER``. Each
good message writes one effect row whose ``handler`` column is the time it was handled
(``t=<epoch seconds>``), so the test reads processing latency from the database.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer

from .models import Effect, OrderPlaced

engine = create_engine(os.environ["APP_DB"], pool_pre_ping=True, hide_parameters=True)
consumer = outboxer.Consumer(
    sessionmaker(engine, class_=outboxer.OutboxSession),
    name=os.environ["APP_CONSUMER"],
    retry=outboxer.Retry(max_attempts=1),
)


@consumer.handler(OrderPlaced, destination=os.environ["APP_DESTINATION"])
def reserve(event: OrderPlaced, session: Session) -> None:
    session.add(Effect(handler=f"t={time.time():.6f}", message_key=str(event.order_id)))


@consumer.handler("fuzz.admin", destination=os.environ["APP_DESTINATION"])
def admin(event: Any, session: Session) -> None:
    # Must never run: the fuzz test only sends other types addressed to this handler.
    session.add(Effect(handler="HIJACKED", message_key="admin"))
