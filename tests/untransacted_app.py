"""A consumer with a handler without a transaction, for a test that kills its process.

``APP_DB``, ``APP_DESTINATION``, ``APP_CONSUMER`` as in tests.consumer_app; ``APP_CALLS``
is the file the handler's "outside call" appends to, with its idempotency key. While the
file ``APP_CRASH`` does not exist, the handler creates it after the call and kills its own
process with SIGKILL: a crash after the call, before the inbox write.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .models import OrderPlaced

engine = create_engine(os.environ["APP_DB"], pool_pre_ping=True)
consumer = outboxer.Consumer(
    sessionmaker(engine, class_=outboxer.OutboxSession), name=os.environ["APP_CONSUMER"]
)


@consumer.handler(OrderPlaced, destination=os.environ["APP_DESTINATION"], transactional=False)
def send_receipt(event: OrderPlaced, context: outboxer.Context) -> None:
    with open(os.environ["APP_CALLS"], "a", encoding="utf-8") as calls:
        calls.write(f"{event.order_id} {context.message_id}\n")
    crash = Path(os.environ["APP_CRASH"])
    if not crash.exists():
        crash.touch()
        os.kill(os.getpid(), signal.SIGKILL)
