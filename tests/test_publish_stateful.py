"""A stateful test of the producer: random programs of transactions, checked against a model.

Hypothesis draws programs of begin / begin_nested (with or without a context manager),
publish, adding a domain row, flush, commit, rollback and close, savepoints released or
rolled back at any depth and in any order, savepoints left open, context managers left by
a normal exit, an exception or a BaseException, and commits interrupted by a
BaseException at the outbox INSERT. Each program runs on a real database (PostgreSQL,
SQLite), through a sync ``OutboxSession``, an ``AsyncOutboxSession``, or a sync session with
the collector off (messages written two at a time as published). After every end of
the outermost transaction, the outbox must hold exactly the messages of the committed
scopes, in publish order, and the domain table exactly their rows.

The example budget: 80 programs per database and flavour in ``make test`` (about 45 s in
all on the project's machine); 600 longer ones with ``HYPOTHESIS_PROFILE=chaos``, which
``make chaos`` sets for the tests marked ``long_profile``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import outboxer

from .conftest import clean
from .models import Order, OrderPlaced
from .services import async_url

T = TypeVar("T")

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "chaos"
BUDGET = settings(
    max_examples=600 if LONG else 80,
    stateful_step_count=50 if LONG else 30,
    deadline=None,  # real databases: a slow statement is not a bug
    print_blob=True,  # a failure prints the line that replays it
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
pytestmark = pytest.mark.long_profile


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt or a task cancellation inside a transaction."""


@dataclass
class Scope:
    """One open transaction of the program: the outermost one or a SAVEPOINT."""

    handle: Any  # the SessionTransaction / AsyncSessionTransaction; None when autobegun
    nested: bool
    entered: bool  # used as a context manager (so only its exit may end it)
    messages: list[UUID] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


class ChunkingSession(outboxer.OutboxSession):
    """The collector off, with chunks small enough for short programs to write many."""

    outboxer_collector = False
    outboxer_chunk_size = 2


class Driver:
    """Runs the program's steps on a sync session; AsyncDriver runs them on asyncio."""

    def __init__(self, engine: Engine, session_class: type[outboxer.OutboxSession]) -> None:
        self.session = session_class(engine)

    def run(self, fn: Callable[[], T]) -> T:
        return fn()

    def begin(self, nested: bool, entered: bool) -> Any:
        handle = self.session.begin_nested() if nested else self.session.begin()
        if entered:
            handle.__enter__()
        return handle

    def exit(self, handle: Any, exc: BaseException | None) -> None:
        handle.__exit__(type(exc) if exc else None, exc, None)

    def end(self, handle: Any, how: str) -> None:
        getattr(handle, how)()

    def session_end(self, how: str) -> None:
        getattr(self.session, how)()

    def flush(self) -> None:
        self.session.flush()

    def autobegun(self) -> Any:
        return self.session.get_transaction()

    def publish(self, order_id: int) -> UUID:
        return self.session.publish(OrderPlaced(order_id=order_id))

    def add(self, order_id: int) -> None:
        self.session.add(Order(id=order_id))

    def pending(self) -> list[UUID]:
        return [m.envelope.message_id for m in self.session.pending_messages()]

    def dispose(self) -> None:
        self.session.close()


class AsyncDriver(Driver):
    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.async_session = outboxer.AsyncOutboxSession(engine)
        self.session = self.async_session.sync_session  # type: ignore[assignment]

    def wait(self, awaitable: Awaitable[T]) -> T:
        async def go() -> T:
            return await awaitable

        return self.loop.run_until_complete(go())

    def begin(self, nested: bool, entered: bool) -> Any:
        s = self.async_session
        handle = s.begin_nested() if nested else s.begin()
        # `async with session.begin():` starts it in __aenter__; `await session.begin()` too.
        return self.wait(handle.__aenter__() if entered else handle.start())

    def exit(self, handle: Any, exc: BaseException | None) -> None:
        self.wait(handle.__aexit__(type(exc) if exc else None, exc, None))

    def end(self, handle: Any, how: str) -> None:
        self.wait(getattr(handle, how)())

    def session_end(self, how: str) -> None:
        self.wait(getattr(self.async_session, how)())

    def flush(self) -> None:
        self.wait(self.async_session.flush())

    def publish(self, order_id: int) -> UUID:
        return self.async_session.publish(OrderPlaced(order_id=order_id))

    def add(self, order_id: int) -> None:
        self.async_session.add(Order(id=order_id))

    def dispose(self) -> None:
        self.wait(self.async_session.close())

    def autobegun(self) -> Any:
        return self.async_session.get_transaction()


class ProducerMachine(RuleBasedStateMachine):
    """Subclassed per database and flavour by :func:`machine_for`."""

    engine: Engine
    driver_factory: Callable[[], Driver]

    def __init__(self) -> None:
        super().__init__()
        clean(self.engine)
        self.driver = self.driver_factory()
        self.scopes: list[Scope] = []
        self.committed_messages: list[UUID] = []
        self.committed_rows: list[int] = []
        self.sequence: dict[UUID, int] = {}
        self.ids = itertools.count(1)
        self.interrupt_insert = False

    # The model ----------------------------------------------------------------------
    def innermost(self) -> Scope:
        """The innermost scope; call after the step: publish(), add() and begin_nested()
        autobegin the outermost transaction, as SQLAlchemy does."""
        if not self.scopes:
            handle = self.driver.autobegun()
            assert handle is not None
            self.scopes.append(Scope(handle, nested=False, entered=False))
        return self.scopes[-1]

    def committed(self, index: int) -> None:
        """Scope ``index`` committed (released, for a SAVEPOINT), with all inside it."""
        gone = self.scopes[index:]
        del self.scopes[index:]
        open_inside = min(len(gone) - 1, 2)
        hypothesis.event(f"{'commit' if index == 0 else 'release'}, {open_inside} open inside")
        messages = [m for s in gone for m in s.messages]
        rows = [r for s in gone for r in s.rows]
        if index == 0:
            self.committed_messages += sorted(messages, key=self.sequence.__getitem__)
            self.committed_rows += rows
            self.check_database()
        else:
            self.scopes[index - 1].messages += messages
            self.scopes[index - 1].rows += rows

    def rolled_back(self, index: int) -> None:
        del self.scopes[index:]
        if index == 0:
            self.check_database()

    def check_database(self) -> None:
        with self.engine.connect() as conn:
            stored = list(
                conn.scalars(select(outboxer.outbox.c.message_id).order_by(outboxer.outbox.c.id))
            )
            rows = sorted(conn.scalars(select(Order.id)))
        assert stored == self.committed_messages
        assert rows == sorted(self.committed_rows)

    def endable(self, index: int) -> bool:
        """Whether scope ``index`` may be ended now: no context manager is open inside it
        (a ``with`` block cannot outlive the code that ends its enclosing transaction)."""
        return not any(s.entered for s in self.scopes[index + 1 :])

    def no_context_manager_open(self) -> bool:
        return not any(s.entered for s in self.scopes)

    # Rules --------------------------------------------------------------------------
    @precondition(lambda self: not self.scopes)
    @rule(entered=st.booleans())
    def begin(self, entered: bool) -> None:
        handle = self.driver.begin(nested=False, entered=entered)
        self.scopes.append(Scope(handle, nested=False, entered=entered))

    @precondition(lambda self: len(self.scopes) < 6)
    @rule(entered=st.booleans())
    def begin_nested(self, entered: bool) -> None:
        handle = self.driver.begin(nested=True, entered=entered)
        self.innermost()
        self.scopes.append(Scope(handle, nested=True, entered=entered))

    @rule()
    def publish(self) -> None:
        message_id = self.driver.publish(next(self.ids))
        self.sequence[message_id] = len(self.sequence)
        self.innermost().messages.append(message_id)

    @rule()
    def add_row(self) -> None:
        order_id = next(self.ids)
        self.driver.add(order_id)
        self.innermost().rows.append(order_id)

    @rule()
    def flush(self) -> None:
        self.driver.flush()

    @precondition(lambda self: any(s.handle is not None for s in self.scopes))
    @rule(data=st.data(), how=st.sampled_from(["commit", "rollback"]))
    def end_scope(self, data: st.DataObject, how: str) -> None:
        """Commit (release) or roll back one transaction by its handle, at any depth."""
        choices = [
            i
            for i, s in enumerate(self.scopes)
            if s.handle is not None and not s.entered and self.endable(i)
        ]
        if not choices:
            return
        index = data.draw(st.sampled_from(choices), label="scope")
        self.driver.end(self.scopes[index].handle, how)
        (self.committed if how == "commit" else self.rolled_back)(index)

    @precondition(lambda self: any(s.entered for s in self.scopes))
    @rule(exit_with=st.sampled_from([None, ValueError, Interrupted]))
    def exit_context_manager(self, exit_with: type[BaseException] | None) -> None:
        """The innermost ``with`` block ends: normally, by an exception, or a BaseException."""
        index = max(i for i, s in enumerate(self.scopes) if s.entered)
        self.driver.exit(self.scopes[index].handle, exit_with() if exit_with else None)
        (self.rolled_back if exit_with else self.committed)(index)

    @precondition(lambda self: self.no_context_manager_open())
    @rule(how=st.sampled_from(["commit", "rollback", "close"]))
    def session_end(self, how: str) -> None:
        self.driver.session_end(how)
        if how == "commit":
            self.committed(0) if self.scopes else self.check_database()
        else:
            self.rolled_back(0) if self.scopes else self.check_database()

    @precondition(lambda self: self.no_context_manager_open())
    @rule()
    def commit_interrupted_at_the_outbox_insert(self) -> None:
        """A BaseException while the outbox is written: nothing of the transaction stays."""
        self.interrupt_insert = True
        try:
            self.driver.session_end("commit")
        except Interrupted:
            self.driver.session_end("rollback")
            self.rolled_back(0)
        else:  # nothing to insert: the commit went through
            self.committed(0) if self.scopes else self.check_database()
        finally:
            self.interrupt_insert = False

    @invariant()
    def pending_messages_are_those_of_open_scopes(self) -> None:
        expected = sorted(
            (m for s in self.scopes for m in s.messages), key=self.sequence.__getitem__
        )
        pending = self.driver.pending()
        if self.driver.session.outboxer_collector:
            assert pending == expected
        else:  # the collector off: those not yet written, the latest ones
            assert pending == expected[len(expected) - len(pending) :]

    def teardown(self) -> None:
        """End the program as a ``with`` block would: leave the open context managers, then
        commit the outermost transaction by its handle, SAVEPOINTs still open; check."""
        try:
            while any(s.entered for s in self.scopes):
                self.exit_context_manager(None)
            if self.scopes:
                self.driver.end(self.scopes[0].handle, "commit")
                self.committed(0)
        finally:
            self.driver.dispose()


def interrupt_outbox_insert(machine: Callable[[], ProducerMachine | None]) -> Any:
    def before_cursor_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        current = machine()
        interrupting = current is not None and current.interrupt_insert
        if interrupting and statement.lstrip().startswith("INSERT INTO outboxer_outbox"):
            raise Interrupted

    return before_cursor_execute


def sqlite_with_real_savepoints(engine: Engine) -> None:
    """pysqlite emits BEGIN only before DML, so a SAVEPOINT opened first starts (and its
    RELEASE commits) the transaction: SQLAlchemy's documented fix is to BEGIN ourselves."""

    @event.listens_for(engine, "connect")
    def no_pysqlite_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


@pytest.fixture
def machine_engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    if engine.dialect.name == "sqlite":
        sqlite_with_real_savepoints(engine)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)
@pytest.mark.parametrize("flavour", ["sync", "async", "sync-collector-off"])
def test_the_outbox_holds_exactly_the_messages_of_committed_scopes(
    machine_engine: Engine, db_url: str, flavour: str
) -> None:
    loop = asyncio.new_event_loop()
    async_engine = create_async_engine(async_url(db_url))
    if machine_engine.dialect.name == "sqlite":
        sqlite_with_real_savepoints(async_engine.sync_engine)
    current: list[ProducerMachine] = []

    def make_driver() -> Driver:
        if flavour == "sync":
            return Driver(machine_engine, outboxer.OutboxSession)
        if flavour == "sync-collector-off":
            return Driver(machine_engine, ChunkingSession)
        return AsyncDriver(async_engine, loop)

    class Machine(ProducerMachine):
        engine = machine_engine
        driver_factory = staticmethod(make_driver)

        def __init__(self) -> None:
            super().__init__()
            current[:] = [self]

    interrupt = interrupt_outbox_insert(lambda: current[0] if current else None)
    for target in (machine_engine, async_engine.sync_engine):
        event.listen(target, "before_cursor_execute", interrupt)
    try:
        run_state_machine_as_test(Machine, settings=BUDGET)
    finally:
        loop.run_until_complete(async_engine.dispose())
        loop.close()
