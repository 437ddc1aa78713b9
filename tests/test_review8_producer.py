"""Review 8, the producer: unusual but legal SQLAlchemy use against the promise that a
message is stored if and only if the transaction that published it commits, once, in
publish order. Each defect found has a test here that failed before its fix; the
attacks that held keep a test too."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, event, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    IntegrityError,
    InvalidRequestError,
    OperationalError,
    PendingRollbackError,
)
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import scoped_session, sessionmaker

import outboxer

from .models import Order, OrderPlaced
from .services import async_url
from .test_publish import stored, stored_ids

SessionFactory = sessionmaker[outboxer.OutboxSession]


def order_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(select(Order.id).order_by(Order.id)))


# Session(info=other.info) --------------------------------------------------------------


def test_a_session_created_with_another_sessions_info_keeps_its_own_messages(
    engine: Engine, Session: SessionFactory
) -> None:
    """``Session(info=...)`` copies the dict's entries: the kept messages lived there, so
    the second session's commit stored the first one's (which then rolled back)."""
    with Session() as request_session:
        request_session.info["tenant"] = "acme"
        request_session.add(Order(id=1))
        mine = request_session.publish(OrderPlaced(order_id=1))
        with Session(info=request_session.info) as audit:  # the request's context passed on
            audit.add(Order(id=2))
            theirs = audit.publish(OrderPlaced(order_id=2))
            audit.commit()
        assert stored_ids(engine) == [theirs]
        assert [m.envelope.message_id for m in request_session.pending_messages()] == [mine]
        request_session.rollback()
    assert order_ids(engine) == [2]
    assert stored_ids(engine) == [theirs]


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"])  # SQLite: one writer
def test_a_session_created_with_another_sessions_info_in_its_commit_stores_each_once(
    engine: Engine,
) -> None:
    """A second session opened from a before_commit listener, after the first wrote."""

    class AuditingSession(outboxer.OutboxSession):
        pass

    def audit(session: Any) -> None:
        if session.info.get("audited"):
            return
        with AuditingSession(engine, info={**session.info, "audited": True}) as other:
            other.add(Order(id=100))
            other.publish(OrderPlaced(order_id=100))
            other.commit()

    event.listen(AuditingSession, "before_commit", audit)
    with AuditingSession(engine) as session:
        session.add(Order(id=1))
        session.publish(OrderPlaced(order_id=1))
        session.commit()
    assert sorted(json.loads(row["payload"])["order_id"] for row in stored(engine)) == [1, 100]
    assert order_ids(engine) == [1, 100]


# A SAVEPOINT begun on the session's connection ---------------------------------------------


def test_publish_inside_a_savepoint_of_the_sessions_connection_is_refused(
    engine: Engine, Session: SessionFactory
) -> None:
    """Before: the message was kept by the session, which never saw the connection's
    SAVEPOINT roll back, and stored at commit without its row."""
    with Session() as session:
        session.add(Order(id=1))
        kept = session.publish(OrderPlaced(order_id=1))
        session.flush()
        savepoint = session.connection().begin_nested()
        session.add(Order(id=2))
        with pytest.raises(outboxer.ConfigurationError, match=r"session\.begin_nested\(\)"):
            session.publish(OrderPlaced(order_id=2))
        session.flush()
        savepoint.rollback()
        session.expunge_all()
        with session.begin_nested():  # the session's own SAVEPOINT is fine
            inner = session.publish(OrderPlaced(order_id=3))
        session.commit()
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == [kept, inner]


def test_a_savepoint_of_the_connection_left_open_at_commit_is_released_by_it(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session() as session:
        session.add(Order(id=1))
        kept = session.publish(OrderPlaced(order_id=1))
        session.flush()
        session.connection().begin_nested()  # left open: the COMMIT releases it
        session.add(Order(id=2))
        session.commit()
    assert order_ids(engine) == [1, 2]
    assert stored_ids(engine) == [kept]


def test_a_rollback_only_session_refuses_to_write_inside_a_savepoint_it_does_not_own(
    engine: Engine,
) -> None:
    """The code around a joined session opens a SAVEPOINT after the session's rows were
    flushed, and the session commits (writes) inside it: rolling it back would drop the
    messages and keep the rows flushed before it."""
    with engine.connect() as conn:
        conn.begin()
        session = outboxer.OutboxSession(bind=conn, join_transaction_mode="rollback_only")
        session.add(Order(id=1))
        session.publish(OrderPlaced(order_id=1))
        session.flush()
        savepoint = conn.begin_nested()
        with pytest.raises(outboxer.ConfigurationError, match="Release or roll back"):
            session.commit()
        savepoint.rollback()
        session.commit()  # now outside it: written with the rows
        session.close()
        conn.commit()
    assert order_ids(engine) == [1]
    assert len(stored_ids(engine)) == 1


# AUTOCOMMIT ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["rollback", "close"])
def test_an_autocommit_engine_is_refused_at_publish(engine: Engine, db_url: str, how: str) -> None:
    """Before: the rows autocommitted at the flush, the rollback (or close) dropped the
    messages: rows stored, their messages lost, no error."""
    auto = create_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        with outboxer.OutboxSession(auto) as session:
            session.add(Order(id=1))
            with pytest.raises(outboxer.ConfigurationError, match="AUTOCOMMIT"):
                session.publish(OrderPlaced(order_id=1))
            getattr(session, how)()
    finally:
        auto.dispose()
    assert stored_ids(engine) == []


def test_an_autocommit_execution_option_is_refused(engine: Engine) -> None:
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    with (
        outboxer.OutboxSession(auto) as s,
        pytest.raises(outboxer.ConfigurationError, match="AUTOCOMMIT"),
    ):
        s.publish(OrderPlaced(order_id=1))
    with outboxer.OutboxSession(engine) as session:
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        with pytest.raises(outboxer.ConfigurationError, match="AUTOCOMMIT"):
            session.publish(OrderPlaced(order_id=2))
    with outboxer.OutboxSession(engine) as session:
        session.publish(OrderPlaced(order_id=3))  # no connection yet: known at commit
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        with pytest.raises(outboxer.ConfigurationError, match="AUTOCOMMIT"):
            session.commit()
        session.rollback()
    assert stored_ids(engine) == []


@pytest.mark.parametrize("db_kind", ["sqlite"])
@pytest.mark.parametrize("recipe", [True, False])
def test_pysqlite_in_its_own_autocommit_mode_needs_the_begin_recipe(
    engine: Engine, db_url: str, recipe: bool
) -> None:
    """``connect_args={"isolation_level": None}`` without SQLAlchemy's BEGIN recipe: no
    transaction at all; the commit says so instead of storing the messages on their own."""
    bare = create_engine(db_url, connect_args={"isolation_level": None})
    if recipe:
        event.listen(bare, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    try:
        with outboxer.OutboxSession(bare) as session:
            session.publish(OrderPlaced(order_id=1))
            if recipe:
                session.commit()
            else:
                with pytest.raises(outboxer.ConfigurationError, match="AUTOCOMMIT"):
                    session.commit()
    finally:
        bare.dispose()
    assert len(stored_ids(engine)) == (1 if recipe else 0)


# Publishing from the session's own events ---------------------------------------------


def hooked(hook: str) -> tuple[type[outboxer.OutboxSession], list[Any]]:
    class HookSession(outboxer.OutboxSession):
        pass

    seen: list[Any] = []

    def late(session: Any, *args: Any) -> None:
        if session.info.pop("armed", False):
            try:
                seen.append(session.publish(OrderPlaced(order_id=9)))
            except outboxer.ConfigurationError as exc:
                seen.append(exc)

    event.listen(HookSession, hook, late)
    return HookSession, seen


def test_publish_from_an_after_rollback_listener_is_refused_not_dropped(engine: Engine) -> None:
    """Before: publish() returned an id and the message was dropped with the rollback
    in progress, silently (the next transaction committed without it)."""
    HookSession, seen = hooked("after_rollback")
    with HookSession(engine) as session:
        session.add(Order(id=1))
        session.info["armed"] = True
        session.rollback()
        session.add(Order(id=2))
        session.commit()
    assert [type(x) for x in seen] == [outboxer.ConfigurationError]
    assert "rolled back" in str(seen[0])
    assert stored_ids(engine) == []


def test_publish_from_an_after_commit_listener_says_what_to_do(engine: Engine) -> None:
    HookSession, seen = hooked("after_commit")
    with HookSession(engine) as session:
        session.add(Order(id=1))
        session.info["armed"] = True
        session.commit()
    assert [type(x) for x in seen] == [outboxer.ConfigurationError]
    assert "before_commit" in str(seen[0])
    assert stored_ids(engine) == []


@pytest.mark.parametrize("hook", ["after_soft_rollback", "after_transaction_end"])
def test_publish_after_a_transaction_ended_goes_to_the_next_one_as_session_add_does(
    engine: Engine, hook: str
) -> None:
    HookSession, seen = hooked(hook)
    with HookSession(engine) as session:
        session.info["armed"] = True
        session.rollback()  # an empty transaction ends
        assert [m.envelope.message_id for m in session.pending_messages()] == seen
        session.add(Order(id=2))
        session.commit()
    assert stored_ids(engine) == seen


def test_a_failed_flush_then_publish_is_refused_until_the_rollback(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        session.add(Order(id=1))
    with Session() as session:
        session.add(Order(id=1))
        with pytest.raises(IntegrityError):
            session.flush()
        with pytest.raises(outboxer.ConfigurationError, match="rollback"):
            session.publish(OrderPlaced(order_id=1))
        session.rollback()
        after = session.publish(OrderPlaced(order_id=2))
        session.commit()
    assert stored_ids(engine) == [after]


# Attacks that held ------------------------------------------------------------------------


def test_publish_after_commit_on_the_same_session_then_commit_again(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session() as session:
        a = session.publish(OrderPlaced(order_id=1))
        session.commit()
        b = session.publish(OrderPlaced(order_id=2))
        session.commit()
        session.publish(OrderPlaced(order_id=3))
        session.rollback()
        c = session.publish(OrderPlaced(order_id=4))
        session.commit()
    assert stored_ids(engine) == [a, b, c]


def test_a_commit_failing_at_its_own_flush_then_retried_stores_only_the_retry(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        session.add(Order(id=1))
    with Session() as session:
        session.publish(OrderPlaced(order_id=1))
        session.add(Order(id=1))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.add(Order(id=2))
        second = session.publish(OrderPlaced(order_id=2))
        session.commit()
    assert order_ids(engine) == [1, 2]
    assert stored_ids(engine) == [second]


# scoped_session ------------------------------------------------------------------------


def test_outboxer_publish_takes_a_scoped_session(engine: Engine) -> None:
    """A scoped_session proxies Session's own methods, not publish(): before,
    ``outboxer.publish(registry, ...)`` refused it too, saying only what it got."""
    registry = scoped_session(sessionmaker(engine, class_=outboxer.OutboxSession))
    try:
        registry.add(Order(id=1))
        published = outboxer.publish(registry, OrderPlaced(order_id=1))
        registry.commit()
        outboxer.publish(registry, OrderPlaced(order_id=2))
        registry.rollback()
    finally:
        registry.remove()
    assert stored_ids(engine) == [published]


async def test_outboxer_publish_takes_an_async_scoped_session(engine: Engine, db_url: str) -> None:
    async_engine = create_async_engine(async_url(db_url))
    registry = async_scoped_session(
        async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession),
        scopefunc=asyncio.current_task,
    )
    try:
        published = outboxer.publish(registry, OrderPlaced(order_id=1))
        await registry.commit()
    finally:
        await registry.remove()
        await async_engine.dispose()
    assert stored_ids(engine) == [published]


# Two-phase commit and several engines ----------------------------------------------------


@pytest.mark.parametrize("db_kind", ["mariadb"])  # PostgreSQL here: max_prepared_transactions 0
def test_a_two_phase_session_stores_its_messages_with_its_rows(engine: Engine) -> None:
    with outboxer.OutboxSession(engine, twophase=True) as session:
        session.add(Order(id=1))
        first = session.publish(OrderPlaced(order_id=1))
        with session.begin_nested():
            second = session.publish(OrderPlaced(order_id=2))
        savepoint = session.begin_nested()
        session.publish(OrderPlaced(order_id=3))
        savepoint.rollback()
        session.prepare()  # the XA PREPARE: outboxer wrote before it
        with pytest.raises(InvalidRequestError, match="prepared"):
            session.publish(OrderPlaced(order_id=4))  # too late for this transaction
        session.commit()
    with outboxer.OutboxSession(engine, twophase=True) as session:
        session.add(Order(id=5))
        session.publish(OrderPlaced(order_id=5))
        session.flush()
        session.rollback()
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == [first, second]


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"])  # SQLite: one writer
def test_a_session_over_two_engines_stores_the_messages_in_the_outbox_engines_transaction(
    engine: Engine, db_url: str
) -> None:
    other = create_engine(db_url)
    binds: dict[Any, Engine] = {
        Order: engine,
        **dict.fromkeys(outboxer.metadata.sorted_tables, other),
    }
    try:
        with outboxer.OutboxSession(binds=binds) as session:
            session.add(Order(id=1))
            kept = session.publish(OrderPlaced(order_id=1))
            session.commit()
            session.add(Order(id=2))
            session.publish(OrderPlaced(order_id=2))
            session.flush()
            session.rollback()
    finally:
        other.dispose()
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == [kept]


# A commit interrupted after the outbox INSERT ran ------------------------------------------


class Interrupted(BaseException):
    """Stands for a KeyboardInterrupt, or an asyncio cancellation of the task awaiting the
    driver (asyncio throws it in at the await even when the statement has completed)."""


@pytest.mark.parametrize("rows", [3, 700])  # 700: two INSERT statements, the second one hit
def test_a_commit_failing_after_the_outbox_insert_ran_then_retried_stores_each_once(
    engine: Engine, Session: SessionFactory, rows: int
) -> None:
    """Before: an error raised after the INSERT had run (here an after_cursor_execute
    listener's: an APM hook, a query counter) left the session keeping the messages it
    had just inserted, so the commit tried again inserted them a second time and
    committed every message of that statement twice (3 of 3, 200 of 700)."""
    seen = [0]

    def fail_after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO outboxer_outbox"):
            seen[0] += 1
            if seen[0] == (2 if rows > 500 else 1):
                raise RuntimeError("a listener failed after the INSERT")

    event.listen(engine, "after_cursor_execute", fail_after)
    try:
        with Session() as session:
            session.add(Order(id=1))
            published = [session.publish(OrderPlaced(order_id=i)) for i in range(rows)]
            with pytest.raises(RuntimeError, match="after the INSERT"):
                session.commit()
            session.commit()  # the caller caught it and commits again
    finally:
        event.remove(engine, "after_cursor_execute", fail_after)
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == published


def test_a_retried_commit_does_not_mistake_another_transactions_row_for_its_own(
    engine: Engine, Session: SessionFactory
) -> None:
    """The look before the retry matches a message by its id and its publish time: a row
    committed earlier with the same explicit message_id is not this transaction's."""
    shared = uuid.uuid4()
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1), message_id=shared)
    armed = [True]

    def fail_before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed[0] and statement.startswith("INSERT INTO outboxer_outbox"):
            armed[0] = False
            raise RuntimeError("a listener failed before the INSERT")

    event.listen(engine, "before_cursor_execute", fail_before)
    try:
        with Session() as session:
            session.publish(OrderPlaced(order_id=2), message_id=shared)
            with pytest.raises(RuntimeError):
                session.commit()
            session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", fail_before)
    assert stored_ids(engine) == [shared, shared]


def test_a_commit_interrupted_after_the_outbox_insert_ran_cannot_be_retried(
    engine: Engine, Session: SessionFactory
) -> None:
    """A BaseException (KeyboardInterrupt, a task's cancellation) inside the statement's
    execution: SQLAlchemy invalidates the connection, so the retry fails and the rollback
    drops rows and messages together (this held before)."""

    def interrupt_after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO outboxer_outbox"):
            raise Interrupted

    event.listen(engine, "after_cursor_execute", interrupt_after)
    try:
        with Session() as session:
            session.add(Order(id=1))
            session.publish(OrderPlaced(order_id=1))
            with pytest.raises(Interrupted):
                session.commit()
            with pytest.raises(PendingRollbackError):
                session.commit()
            session.rollback()
    finally:
        event.remove(engine, "after_cursor_execute", interrupt_after)
    assert order_ids(engine) == []
    assert stored_ids(engine) == []


def test_collector_off_a_chunk_failing_after_it_ran_is_not_written_twice(engine: Engine) -> None:
    class Chunking(outboxer.OutboxSession):
        outboxer_collector = False
        outboxer_chunk_size = 4

    armed = [True]

    def fail_after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed[0] and statement.startswith("INSERT INTO outboxer_outbox"):
            armed[0] = False
            raise RuntimeError("a listener failed after the INSERT")

    event.listen(engine, "after_cursor_execute", fail_after)
    try:
        with Chunking(engine) as session:
            published = [session.publish(OrderPlaced(order_id=i)) for i in range(3)]
            with pytest.raises(RuntimeError):
                published.append(session.publish(OrderPlaced(order_id=3)))  # the chunk
            published.append(session.pending_messages()[-1].envelope.message_id)
            published += [session.publish(OrderPlaced(order_id=i)) for i in range(4, 10)]
            session.commit()
    finally:
        event.remove(engine, "after_cursor_execute", fail_after)
    assert stored_ids(engine) == published


# asyncio: a commit cancelled while the outbox INSERT waits --------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql"])
async def test_a_commit_cancelled_while_its_outbox_insert_waits_stores_nothing(
    engine: Engine, db_url: str
) -> None:
    """The task's cancellation reaches the driver inside the INSERT (another transaction
    holds the outbox table locked): SQLAlchemy invalidates the connection, the rows and the
    messages go together, and the next transaction stores its own once."""
    async_engine = create_async_engine(async_url(db_url))
    Session = async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession)
    try:
        with engine.connect() as locker:
            locker.begin()
            locker.exec_driver_sql("LOCK TABLE outboxer_outbox IN EXCLUSIVE MODE")

            async def place() -> None:
                async with Session() as session:
                    session.add(Order(id=1))
                    session.publish(OrderPlaced(order_id=1))
                    await session.commit()

            task = asyncio.create_task(place())
            deadline = asyncio.get_running_loop().time() + 20
            while not waiting_on_a_lock(engine):  # the INSERT has reached the lock
                assert asyncio.get_running_loop().time() < deadline, "the INSERT never waited"
                assert not task.done(), task
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            locker.rollback()
        assert order_ids(engine) == []
        assert stored_ids(engine) == []
        async with Session.begin() as session:
            session.add(Order(id=1))
            again = session.publish(OrderPlaced(order_id=1))
        assert order_ids(engine) == [1]
        assert stored_ids(engine) == [again]
    finally:
        await async_engine.dispose()


def waiting_on_a_lock(engine: Engine, statement: str = "INSERT INTO outboxer_outbox") -> bool:
    with engine.connect() as conn:
        return bool(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND starts_with(query, %(statement)s)",
                {"statement": statement},
            ).scalar_one()
        )


def test_bulk_statements_and_publish_share_the_transaction(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session() as session:
        session.execute(insert(Order), [{"id": i} for i in range(1, 50)])
        session.publish(OrderPlaced(order_id=1))
        session.bulk_save_objects([Order(id=100), Order(id=101)])
        session.rollback()
        session.execute(insert(Order), [{"id": i} for i in range(1, 5)])
        kept = session.publish(OrderPlaced(order_id=2))
        with session.begin_nested():
            session.bulk_save_objects([Order(id=200)])
            inner = session.publish(OrderPlaced(order_id=3))
        session.commit()
    assert order_ids(engine) == [1, 2, 3, 4, 200]
    assert stored_ids(engine) == [kept, inner]


# MariaDB: a deadlock ends the whole transaction ---------------------------------------------


def lose_a_deadlock(engine: Engine, session: outboxer.OutboxSession, *, savepoint: bool) -> Any:
    """Make ``session`` the victim of a real deadlock (its transaction is the lighter one,
    so InnoDB rolls it back); returns the error its caller caught, and the other
    transaction's connection, still open."""
    other = engine.connect()
    other.begin()
    other.execute(update(Order).where(Order.id >= 100).values(customer="heavy"))
    other.execute(update(Order).where(Order.id == 1).values(customer="other"))
    caught: list[BaseException] = []
    waiting = threading.Event()

    def victim() -> None:
        try:
            if savepoint:
                with session.begin_nested():
                    session.execute(update(Order).where(Order.id == 2).values(customer="s"))
                    waiting.set()
                    session.execute(update(Order).where(Order.id == 1).values(customer="s"))
            else:
                session.execute(update(Order).where(Order.id == 2).values(customer="s"))
                waiting.set()
                session.execute(update(Order).where(Order.id == 1).values(customer="s"))
        except OperationalError as exc:  # what the application catches, and goes on
            caught.append(exc)

    thread = threading.Thread(target=victim)
    thread.start()
    assert waiting.wait(10)
    deadline = time.monotonic() + 10
    while not lock_waits(engine):  # the victim waits for row 1
        assert time.monotonic() < deadline, "the session never waited for the lock"
    other.execute(update(Order).where(Order.id == 2).values(customer="other"))  # deadlock
    thread.join(20)
    assert not thread.is_alive()
    assert caught, "the session was not the deadlock's victim"
    return other


def lock_waits(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
            ).scalar_one()
        )


@pytest.mark.parametrize("db_kind", ["mariadb"])
@pytest.mark.parametrize("savepoint", [True, False])
def test_a_deadlock_the_application_caught_makes_the_commit_refuse_not_store_lost_rows_messages(
    engine: Engine, Session: SessionFactory, savepoint: bool
) -> None:
    """Before: InnoDB rolled the whole transaction back (the row of order 3 with it), the
    application caught the error (from the SAVEPOINT's ROLLBACK TO, 1305, or from the
    statement, 1213) and went on, and the commit stored order 3's message in the new
    transaction the server had begun: a message without its row."""
    with engine.begin() as conn:
        conn.execute(insert(Order), [{"id": 1}, {"id": 2}] + [{"id": 100 + i} for i in range(50)])
    with Session() as session:
        session.add(Order(id=3))
        session.publish(OrderPlaced(order_id=3))
        session.flush()
        other = lose_a_deadlock(engine, session, savepoint=savepoint)
        try:
            session.add(Order(id=4))
            session.publish(OrderPlaced(order_id=4))
            with pytest.raises(outboxer.OutboxerError, match="rolled this transaction back"):
                session.commit()
            session.rollback()
        finally:
            other.commit()
            other.close()
        assert stored_ids(engine) == []
        session.add(Order(id=3))  # the whole transaction again: stored
        again = session.publish(OrderPlaced(order_id=3))
        session.commit()
    assert [i for i in order_ids(engine) if i < 100] == [1, 2, 3]
    assert stored_ids(engine) == [again]


@pytest.mark.parametrize("how", ["close", "reset", "invalidate"])
def test_ending_the_session_before_commit_drops_its_messages(
    engine: Engine, Session: SessionFactory, how: str
) -> None:
    with Session() as session:
        session.add(Order(id=1))
        session.publish(OrderPlaced(order_id=1))
        session.flush()
        getattr(session, how)()
        after = session.publish(OrderPlaced(order_id=2))  # the session's next transaction
        session.commit()
    assert order_ids(engine) == []
    assert stored_ids(engine) == [after]


@pytest.mark.parametrize("how", ["expunge_all", "expire_all"])
def test_messages_are_not_orm_objects_expunge_and_expire_keep_them(
    engine: Engine, Session: SessionFactory, how: str
) -> None:
    """The message belongs to the transaction, not to the identity map: clearing the
    session's objects does not unpublish it (as it does not undo session.execute())."""
    with Session() as session:
        session.add(Order(id=1))
        session.flush()
        published = session.publish(OrderPlaced(order_id=1))
        getattr(session, how)()
        session.commit()
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == [published]


@pytest.mark.parametrize("db_kind", ["postgresql"])
async def test_a_message_published_while_the_commit_awaits_its_outbox_insert_is_stored(
    engine: Engine, db_url: str
) -> None:
    """publish() does no I/O, so another task can call it on an AsyncOutboxSession while
    that session's commit awaits the outbox INSERT (SQLAlchemy guards only I/O against
    concurrent tasks). Before: the message joined the kept list after the INSERT's rows
    were chosen, and the end of the transaction dropped it; publish() had returned its
    id and no error came."""
    async_engine = create_async_engine(async_url(db_url))
    try:
        with engine.connect() as locker:
            locker.begin()
            locker.exec_driver_sql("LOCK TABLE outboxer_outbox IN EXCLUSIVE MODE")
            session = outboxer.AsyncOutboxSession(async_engine)
            session.add(Order(id=1))
            first = session.publish(OrderPlaced(order_id=1))
            committing = asyncio.create_task(session.commit())
            deadline = asyncio.get_running_loop().time() + 20
            while not waiting_on_a_lock(engine):
                assert asyncio.get_running_loop().time() < deadline, "the INSERT never waited"
                assert not committing.done(), committing
                await asyncio.sleep(0.02)
            second = session.publish(OrderPlaced(order_id=2))  # another task's publish
            locker.rollback()
        await committing
        await session.close()
    finally:
        await async_engine.dispose()
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == [first, second]


@pytest.mark.timeout(60)  # before the fix the publish() blocked the event loop for good
@pytest.mark.parametrize("db_kind", ["postgresql"])
async def test_a_publish_while_the_commit_awaits_its_commit_says_what_happened(
    engine: Engine, db_url: str
) -> None:
    """Another task's publish() while the COMMIT runs (held here by a deferred trigger
    waiting on an advisory lock): the message cannot join that transaction any more.
    Before, publish() wrote through at once, with I/O from outside the commit's greenlet
    on the connection the COMMIT was using: it never returned, and the event loop (the
    COMMIT's task with it) hung."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION r8_hold_commit() RETURNS trigger AS $$ BEGIN "
            "PERFORM pg_advisory_xact_lock(808); RETURN NULL; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER r8_hold_commit AFTER INSERT ON test_orders "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION r8_hold_commit()"
        )
    async_engine = create_async_engine(async_url(db_url))
    try:
        with engine.connect() as locker:
            locker.exec_driver_sql("SELECT pg_advisory_lock(808)")
            session = outboxer.AsyncOutboxSession(async_engine)
            session.add(Order(id=1))
            first = session.publish(OrderPlaced(order_id=1))
            committing = asyncio.create_task(session.commit())
            deadline = asyncio.get_running_loop().time() + 20
            while not waiting_on_a_lock(engine, "COMMIT"):
                assert asyncio.get_running_loop().time() < deadline, "the COMMIT never waited"
                assert not committing.done(), committing
                await asyncio.sleep(0.02)
            with pytest.raises(outboxer.ConfigurationError, match="commit is under way"):
                session.publish(OrderPlaced(order_id=2))
            locker.exec_driver_sql("SELECT pg_advisory_unlock(808)")
            locker.commit()
        await committing
        await session.close()
    finally:
        await async_engine.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER r8_hold_commit ON test_orders")
            conn.exec_driver_sql("DROP FUNCTION r8_hold_commit()")
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == [first]
