"""Large transactions and large messages: the outbox INSERT fits the database's limits.

MariaDB refuses a statement longer than ``max_allowed_packet`` (and drops the connection:
"MySQL server has gone away"), so the INSERT is chunked by bytes as well as by rows, and a
single message that cannot fit is refused with an error that names its size, the limit
and the fix.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .models import Anything, Order

SessionFactory = sessionmaker[outboxer.OutboxSession]

# 48 KiB of JSON, with quotes and backslashes that MariaDB's drivers escape (so a row is
# longer on the wire than its payload).
BIG = 'x"\\' * (48 * 1024 // 3)


def outbox_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(outboxer.outbox)) or 0)


def test_a_transaction_of_400_messages_of_48_kib_commits(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        session.add(Order(id=1))
        for i in range(400):
            session.publish(Anything(value=BIG), key=str(i))
    assert outbox_count(engine) == 400
    with engine.connect() as conn:
        lengths = set(conn.scalars(select(func.length(outboxer.outbox.c.payload))))
    assert len(lengths) == 1


@pytest.mark.parametrize("db_kind", ["mariadb"], indirect=True)
def test_a_message_larger_than_max_allowed_packet_is_refused_naming_size_limit_and_fix(
    engine: Engine, Session: SessionFactory
) -> None:
    with engine.connect() as conn:
        limit = int(conn.scalar(text("SELECT @@max_allowed_packet")) or 0)
    huge = Anything(value="y" * (limit // 2))  # drivers send a payload hex-encoded or escaped

    # A fresh engine's first transaction: publish() does no I/O, so the commit refuses it.
    with pytest.raises(outboxer.MessageTooLarge) as at_commit, Session.begin() as session:
        session.add(Order(id=1))
        session.publish(huge)
    assert f"max_allowed_packet is {limit} bytes" in str(at_commit.value)
    assert outbox_count(engine) == 0  # nothing of that transaction committed

    # Once a session of this engine has used a connection, publish() itself refuses it.
    with Session.begin() as session:
        session.add(Order(id=2))
        with pytest.raises(outboxer.MessageTooLarge) as caught:
            session.publish(huge)
        kept = session.publish(Anything(value="small"))
    message = str(caught.value)
    assert f"max_allowed_packet is {limit} bytes" in message, message
    assert "test.anything" in message and "SET GLOBAL max_allowed_packet" in message
    with engine.connect() as conn:
        assert list(conn.scalars(select(outboxer.outbox.c.message_id))) == [kept]
        assert list(conn.scalars(select(Order.id))) == [2]


@pytest.mark.parametrize("db_kind", ["mariadb"], indirect=True)
def test_core_publish_refuses_a_message_larger_than_max_allowed_packet(engine: Engine) -> None:
    with engine.connect() as conn:
        limit = int(conn.scalar(text("SELECT @@max_allowed_packet")) or 0)
    with engine.begin() as conn, pytest.raises(outboxer.MessageTooLarge, match="max_allowed"):
        outboxer.publish(conn, Anything(value="y" * (limit // 2)))
    assert outbox_count(engine) == 0
