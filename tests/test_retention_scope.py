"""A consumer's retention prunes its own inbox rows and dead letters, not the table's.

``Consumer(inbox_retention=..., dead_letter_retention=...)`` deleted every consumer's
inbox rows and every dead letter on its database past its window: a consumer with a window
of hours, beside one of 30 days on the same database, took away the other's deduplication
(a redelivery after a day ran its handlers again) and its dead letters, the relay's too.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

import outboxer
from outboxer.testing import drain

from .relaying import SessionFactory


def age_everything(engine: Engine, days: float) -> None:
    then = datetime.now(timezone.utc) - timedelta(days=days)
    with engine.begin() as connection:
        connection.execute(update(outboxer.inbox).values(processed_at=then))
        connection.execute(update(outboxer.dead_letter).values(last_failed_at=then))


def inbox_of(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(outboxer.inbox.c.handler, func.count()).group_by(outboxer.inbox.c.handler)
        ).all()
    return {str(handler): int(count) for handler, count in rows}


def dead_letters_of(engine: Engine) -> dict[str | None, int]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(outboxer.dead_letter.c.consumer, func.count()).group_by(
                outboxer.dead_letter.c.consumer
            )
        ).all()
    return {consumer: int(count) for consumer, count in rows}


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_consumer_prunes_only_its_own_inbox_rows_and_dead_letters(
    engine: Engine, Session: SessionFactory
) -> None:
    # "audit_x" has an underscore: a LIKE pattern would take "auditYx:..." rows too.
    audit = outboxer.Consumer(Session, name="audit_x", inbox_retention=30 * 86400)
    cache = outboxer.Consumer(
        Session, name="cache", inbox_retention=3600, dead_letter_retention=3600
    )
    lookalike = outboxer.Consumer(Session, name="auditYx", inbox_retention=30 * 86400)
    once = outboxer.Retry(max_attempts=1)

    for consumer in (audit, cache, lookalike):

        @consumer.handler("retention.seen", destination="retention")
        def seen(event: dict[str, str]) -> None: ...

        @consumer.handler("retention.bad", destination="retention", retry=once)
        def bad(event: dict[str, str]) -> None:
            raise ValueError("no")

    with Session.begin() as session:
        session.publish({}, type="retention.seen", destination="retention")
        session.publish({}, type="retention.bad", destination="retention")
    drain(engine, [audit, cache, lookalike], fail_fast=False)
    assert inbox_of(engine) == {"audit_x:seen": 1, "cache:seen": 1, "auditYx:seen": 1}
    assert dead_letters_of(engine) == {"audit_x": 1, "cache": 1, "auditYx": 1}

    age_everything(engine, days=2)
    assert cache.prune() == (1, 1)  # its own row and dead letter, past its hour
    assert audit.prune() == (0, 0)  # nothing of its own is 30 days old
    assert inbox_of(engine) == {"audit_x:seen": 1, "auditYx:seen": 1}
    assert dead_letters_of(engine) == {"audit_x": 1, "auditYx": 1}

    age_everything(engine, days=31)
    assert audit.prune() == (1, 0)  # its row; it keeps dead letters (no retention set)
    assert inbox_of(engine) == {"auditYx:seen": 1}
