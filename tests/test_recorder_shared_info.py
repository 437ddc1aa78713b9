"""``outboxer.testing.Published`` with sessions that share their ``info`` (2026-11-30).

Before: the recorder kept what a commit wrote in ``session.info``. A session made with
``Session(info=other.info)`` (a request's context passed on) shared that list, so the
second session's commit recorded the first one's messages too, and a message the first
session then rolled back was reported as published.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

import outboxer
from outboxer.testing import Published

from .models import OrderPlaced


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)  # two writers
def test_a_session_sharing_anothers_info_records_only_its_own_commit(engine: Engine) -> None:
    with Published() as published:
        first = outboxer.OutboxSession(engine)
        first.outboxer_collector = False  # its messages are written as they come
        first.outboxer_chunk_size = 1
        first.begin()
        first.publish(OrderPlaced(order_id=1))
        first.flush()
        second = outboxer.OutboxSession(engine, info=first.info)
        with second.begin():
            second.publish(OrderPlaced(order_id=2))
        first.rollback()
        first.close()
        second.close()
    assert [e.order_id for e in published.events(OrderPlaced)] == [2]
    with engine.connect() as conn:
        assert conn.execute(outboxer.outbox.select()).all() != []  # order 2 was stored
