"""A consumer whose database drops the connection while it prunes its inbox (retention):
one warning line, as for every other outage (the traceback only at debug level), and the
next prune runs."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport

from .faultproxy import FaultProxy
from .models import OrderPlaced
from .test_relay_faults import wait_until

DEFAULT_PORTS = {"postgresql": 5432, "mariadb": 3306}


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_a_connection_cut_while_pruning_the_inbox_is_one_line_and_pruning_goes_on(
    db_kind: str, db_url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with FaultProxy.to(db_url, DEFAULT_PORTS[db_kind]) as proxy:
        app_db = create_engine(proxy.url(db_url))
        prunes = {"seen": 0, "cut": 0}

        def cut(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("DELETE FROM OUTBOXER_INBOX"):
                prunes["seen"] += 1
                if not prunes["cut"]:
                    prunes["cut"] = 1
                    proxy.cut()

        event.listen(app_db, "before_cursor_execute", cut)
        consumer = outboxer.Consumer(
            sessionmaker(app_db, class_=outboxer.OutboxSession),
            name=f"prune-{uuid.uuid4().hex[:8]}",
        )

        @consumer.handler(OrderPlaced, destination=f"d-{uuid.uuid4().hex[:8]}")
        def reserve(event: OrderPlaced, session: Session) -> None:
            pass

        caplog.set_level(logging.DEBUG, logger="outboxer")
        errors: list[BaseException] = []

        def run() -> None:
            try:
                consumer.run(MemoryTransport(MemoryBroker()), prune_interval=0.05)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: prunes["seen"] >= 3, 30, "a prune after the cut one")
        finally:
            consumer.stop()
            thread.join(timeout=30)
            app_db.dispose()
    assert not thread.is_alive() and not errors, errors
    loud = [
        f"{r.levelname}: {r.getMessage()}" for r in caplog.records if r.exc_info and r.levelno > 10
    ]
    assert not loud, loud
    assert any("prun" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
