"""Publishing from ORM sessions (sync and asyncio) and from Core connections.

``session.publish(event)`` serializes the event now (a bad payload raises in the caller)
and hands it to the collector (:mod:`outboxer.collector`), which keeps it in the session
and writes it into the same transaction just before its COMMIT, or drops it with a
rollback. Core's ``outboxer.publish(connection, ...)`` inserts at once: the database
itself then keeps the rows of released SAVEPOINTs and drops those of rolled-back ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar
from uuid import UUID

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from . import collector, store
from .async_support import (  # stand-ins without greenlet
    AsyncConnection,
    AsyncSession,
    async_scoped_session,
)
from .errors import ConfigurationError, NotAnOutboxSession
from .publishing import Key, build_message

__all__ = ["AsyncOutboxSession", "OutboxMixin", "OutboxSession", "publish"]


class OutboxMixin:
    """Gives a :class:`~sqlalchemy.orm.Session` subclass ``publish()``.

    ``class MySession(outboxer.OutboxMixin, Session)`` installs the session hooks on
    ``MySession`` (and so on its subclasses) once, when the class is defined.
    """

    outboxer_notify: ClassVar[bool] = True
    """Send a PostgreSQL NOTIFY with each transaction that published, to wake relays up."""

    outboxer_collector: bool = True
    """Keep published messages in memory until commit (the default). False: write them to
    the outbox table as they are published, ``outboxer_chunk_size`` at a time (or 8 MiB of
    payload), so that a huge transaction keeps memory flat; ``publish()`` then flushes and
    INSERTs now and then. Set it on a subclass, or on one session
    (``session.outboxer_collector = False``). docs/publishing.md says what it changes."""

    outboxer_chunk_size: int = 500
    """With the collector off: how many messages one INSERT writes."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, Session) and not any(
            "_outboxer_hooked" in vars(base) for base in cls.__mro__[1:]
        ):
            collector.install_hooks(cls)
            cls._outboxer_hooked = True  # type: ignore[attr-defined]

    def publish(
        self,
        event: Any,
        *,
        type: str | None = None,
        destination: str | None = None,
        key: Key = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        message_id: UUID | str | None = None,
        correlation_id: str | UUID | None = None,
    ) -> UUID:
        """Publish ``event`` when this session's transaction commits; returns the message id.

        ``event`` is a registered dataclass or pydantic model, or a dict with ``type=``.
        ``destination`` overrides the type's; ``key`` (a str or an int) orders messages
        (same key, commit order), None takes the type's key and ``outboxer.NO_KEY`` gives
        none; ``headers`` are str-to-str; ``delay`` (seconds or timedelta) holds the
        message back; ``message_id`` is a UUID or its text form. The payload is serialized
        now: a bad one raises here and nothing is kept. No I/O happens until commit.
        """
        if not isinstance(self, Session):
            raise NotAnOutboxSession(
                f"{self.__class__.__qualname__} mixes in OutboxMixin but is not a Session"
            )
        message = build_message(
            event,
            type=type,
            destination=destination,
            key=key,
            headers=headers,
            delay=delay,
            message_id=message_id,
            correlation_id=correlation_id,
        )
        collector.keep(
            self, message, collector=self.outboxer_collector, chunk_size=self.outboxer_chunk_size
        )
        return message.envelope.message_id

    def begin(self, nested: bool = False) -> SessionTransaction:
        """:meth:`Session.begin`; with the collector off, a SAVEPOINT first writes the
        messages kept so far, which belong to the transaction around it."""
        assert isinstance(self, Session)
        if nested and not self.outboxer_collector:
            collector.write_before_savepoint(self)
        transaction: SessionTransaction = super().begin(nested=nested)  # type: ignore[misc]
        return transaction

    def pending_messages(self) -> list[store.NewMessage]:
        """Messages published in this session that its next commit will store."""
        assert isinstance(self, Session)
        return collector.kept(self)


class OutboxSession(OutboxMixin, Session):
    """A :class:`~sqlalchemy.orm.Session` with ``publish()``."""


class AsyncOutboxSession(AsyncSession):
    """An :class:`~sqlalchemy.ext.asyncio.AsyncSession` with ``publish()``.

    ``publish()`` is a plain method (no ``await``): it does no I/O. The wrapped sync
    session is an :class:`OutboxSession`, so the commit hooks are the same.
    """

    sync_session_class: type[Session] = OutboxSession

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sync_session, OutboxMixin):
            raise NotAnOutboxSession(
                f"AsyncOutboxSession needs a sync_session_class that mixes in "
                f"outboxer.OutboxMixin; {type(self.sync_session).__qualname__} does not"
            )

    def publish(
        self,
        event: Any,
        *,
        type: str | None = None,
        destination: str | None = None,
        key: Key = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        message_id: UUID | str | None = None,
        correlation_id: str | UUID | None = None,
    ) -> UUID:
        """Publish ``event`` when this session's transaction commits (see OutboxMixin.publish)."""
        session = self.sync_session
        assert isinstance(session, OutboxMixin)
        if not session.outboxer_collector:
            raise ConfigurationError(
                "with the collector off, publish() writes to the database as it goes, which "
                "an AsyncOutboxSession cannot do from a plain call: publish inside "
                "await session.run_sync(fn), where fn(sync_session) calls "
                "sync_session.publish(...)"
            )
        if collector.committing(session):
            # Another task's publish() while this session's commit awaits its COMMIT
            # (a listener inside the commit gets the sync session, not this one): the
            # message could only be written with I/O outside the commit's greenlet.
            raise ConfigurationError(
                "publish() on an AsyncOutboxSession whose commit is under way (from another "
                "task?): its messages are written and its COMMIT is running. Publish before "
                "awaiting commit(), or after it returns (the session's next transaction); "
                "give each task its own session"
            )
        return session.publish(
            event,
            type=type,
            destination=destination,
            key=key,
            headers=headers,
            delay=delay,
            message_id=message_id,
            correlation_id=correlation_id,
        )


def publish(
    target: Connection
    | Session
    | AsyncSession
    | AsyncConnection
    | scoped_session[Any]
    | async_scoped_session[Any],
    event: Any,
    *,
    type: str | None = None,
    destination: str | None = None,
    key: Key = None,
    headers: Mapping[str, str] | None = None,
    delay: float | timedelta | None = None,
    message_id: UUID | str | None = None,
    correlation_id: str | UUID | None = None,
    notify: bool = True,
) -> UUID:
    """Publish ``event`` through ``target``; returns the message id.

    With a Core :class:`~sqlalchemy.engine.Connection`, the row is inserted now, in the
    connection's current transaction (commit it as usual; a rolled-back SAVEPOINT drops
    it). With an outbox session, this is ``session.publish(...)``; with a
    ``scoped_session`` (or ``async_scoped_session``) of outbox sessions, its current
    session's. For an
    ``AsyncConnection``, call ``await conn.run_sync(outboxer.publish, event, ...)``.
    """
    options: dict[str, Any] = {
        "type": type,
        "destination": destination,
        "key": key,
        "headers": headers,
        "delay": delay,
        "message_id": message_id,
        "correlation_id": correlation_id,
    }
    if isinstance(target, (scoped_session, async_scoped_session)):
        # The registry of a scoped_session: publish through its current session (a
        # scoped_session proxies Session's own methods only, not publish()).
        target = target()
    if isinstance(target, (OutboxMixin, AsyncOutboxSession)):
        return target.publish(event, **options)
    if isinstance(target, (Session, AsyncSession)):
        raise NotAnOutboxSession(
            f"{type_name(target)} cannot publish: it is not an outbox session. Create sessions "
            "with sessionmaker(engine, class_=outboxer.OutboxSession) (AsyncOutboxSession for "
            "asyncio), or mix outboxer.OutboxMixin into your Session class"
        )
    if isinstance(target, AsyncConnection):
        raise ConfigurationError(
            "outboxer.publish() takes a sync Connection; with an AsyncConnection call "
            "await conn.run_sync(outboxer.publish, event, ...)"
        )
    if not isinstance(target, Connection):
        raise ConfigurationError(
            f"outboxer.publish() needs a Connection or an outbox session, got {type_name(target)}"
        )
    message = build_message(event, **options)
    store.insert_messages(target, [message], notify=notify)
    return message.envelope.message_id


def type_name(obj: object) -> str:
    return obj.__class__.__qualname__
