"""A session whose ``binds`` cover the application's tables but not outboxer's.

``publish()`` accepted the message and the application's COMMIT failed with SQLAlchemy's
"Could not locate a bind configured on SQL expression or this Session", naming neither
the outbox table nor the fix; the application's own rows were rolled back with it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.errors import ConfigurationError

from .models import Base, Effect, OrderPlaced


def test_publish_names_the_missing_bind_of_the_outbox_table(engine: Engine) -> None:
    Session = sessionmaker(class_=outboxer.OutboxSession, binds={Base: engine})
    with Session() as session:
        session.add(Effect(handler="h", message_key="1"))
        with pytest.raises(ConfigurationError) as raised:
            session.publish(OrderPlaced(order_id=1), destination="orders")
        message = str(raised.value)
        assert "outboxer_outbox" in message and "binds" in message, message
        session.commit()  # the application's own row still commits
    with engine.connect() as conn:
        assert conn.execute(select(Effect.message_key)).scalars().all() == ["1"]


def test_with_the_outbox_bound_too_the_message_is_stored(engine: Engine) -> None:
    Session = sessionmaker(
        class_=outboxer.OutboxSession,
        binds={Base: engine, **dict.fromkeys(outboxer.metadata.sorted_tables, engine)},
    )
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=2), destination="orders")
    with engine.connect() as conn:
        assert len(conn.execute(select(outboxer.outbox.c.id)).all()) == 1


def test_a_session_with_no_database_at_all_is_left_to_the_commit() -> None:
    session = outboxer.OutboxSession()
    session.publish(OrderPlaced(order_id=3), destination="orders")  # as Session.add() would
    session.rollback()
