"""Publishing from ORM sessions (sync and asyncio) and from Core connections.

``session.publish(event)`` does no I/O: it serializes the event and keeps it in the
session (``session.info``). Session events then decide its fate:

* ``before_commit`` of the outermost transaction flushes the session, then writes every
  kept message with one multi-row INSERT (and, on PostgreSQL, one NOTIFY) in that same
  transaction. Flushing first means the outbox rows get their ids after the domain
  writes took their row locks, so transactions that touch the same rows get outbox ids
  in commit order.
* ``after_soft_rollback`` of a SAVEPOINT drops the messages published inside it (and
  inside SAVEPOINTs nested in it); a rollback of the whole transaction drops them all.
* ``after_transaction_end`` of the outermost transaction forgets whatever is left (a
  session closed without commit stores nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar
from uuid import UUID

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction

from . import store
from .async_support import AsyncConnection, AsyncSession  # stand-ins without greenlet
from .errors import ConfigurationError, NotAnOutboxSession
from .publishing import build_message
from .tables import outbox

__all__ = ["AsyncOutboxSession", "OutboxMixin", "OutboxSession", "publish"]

_PENDING = "outboxer.pending"
# Lets a Session with several binds pick the engine that holds the outbox table.
_BIND_ARGUMENTS = {"clause": outbox.insert()}


@dataclass
class _Pending:
    message: store.NewMessage
    transaction: SessionTransaction
    """The innermost transaction open at publish() time."""


# Session hooks ---------------------------------------------------------------------------
def _install_hooks(session_class: type[Session]) -> None:
    event.listen(session_class, "before_commit", _before_commit)
    event.listen(session_class, "after_soft_rollback", _after_soft_rollback)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)


def _before_commit(session: Session) -> None:
    if session.get_nested_transaction() is not None:
        return  # a SAVEPOINT is being released; the outermost commit writes
    pending: list[_Pending] | None = session.info.get(_PENDING)
    if not pending:
        return
    # Flush first so domain writes take their row locks before outbox ids are assigned.
    session.flush()
    messages = [p.message for p in pending]
    pending.clear()
    connection = session.connection(bind_arguments=_BIND_ARGUMENTS)
    notify = getattr(session, "outboxer_notify", True)
    store.insert_messages(connection, messages, notify=notify)


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    pending: list[_Pending] | None = session.info.get(_PENDING)
    if not pending:
        return
    if previous_transaction.nested:
        pending[:] = [p for p in pending if not _inside(p.transaction, previous_transaction)]
    elif previous_transaction.parent is None:
        pending.clear()
    # else: an internal flush subtransaction; the SAVEPOINT or outermost transaction it
    # belongs to gets its own rollback event.


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and not transaction.nested:
        pending = session.info.get(_PENDING)
        if pending:
            pending.clear()


def _inside(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    """Whether ``transaction`` is ``ancestor`` or nested (at any depth) inside it."""
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


class OutboxMixin:
    """Gives a :class:`~sqlalchemy.orm.Session` subclass ``publish()``.

    ``class MySession(outboxer.OutboxMixin, Session)`` installs the session hooks on
    ``MySession`` (and so on its subclasses) once, when the class is defined.
    """

    outboxer_notify: ClassVar[bool] = True
    """Send a PostgreSQL NOTIFY with each transaction that published, to wake relays up."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, Session) and not any(
            "_outboxer_hooked" in vars(base) for base in cls.__mro__[1:]
        ):
            _install_hooks(cls)
            cls._outboxer_hooked = True  # type: ignore[attr-defined]

    def publish(
        self,
        event: Any,
        *,
        type: str | None = None,
        destination: str | None = None,
        key: object = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        message_id: UUID | None = None,
        correlation_id: str | None = None,
    ) -> UUID:
        """Publish ``event`` when this session's transaction commits; returns the message id.

        ``event`` is a registered dataclass or pydantic model, or a dict with ``type=``.
        ``destination`` overrides the type's; ``key`` orders messages (same key, commit
        order); ``headers`` are str-to-str; ``delay`` (seconds or timedelta) holds the
        message back. The payload is serialized now: a bad one raises here and nothing is
        kept. No I/O happens until commit.
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
        # Autobegin like Session.add() does (no I/O: no connection is checked out yet), so
        # a rollback() right after publish() drops the message the same way it drops adds.
        transaction = self.get_nested_transaction() or self._autobegin_t()
        self.info.setdefault(_PENDING, []).append(_Pending(message, transaction))
        return message.envelope.message_id

    def pending_messages(self) -> list[store.NewMessage]:
        """Messages published in this session that its next commit will store."""
        assert isinstance(self, Session)
        return [p.message for p in self.info.get(_PENDING, ())]


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
        key: object = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        message_id: UUID | None = None,
        correlation_id: str | None = None,
    ) -> UUID:
        """Publish ``event`` when this session's transaction commits (see OutboxMixin.publish)."""
        session = self.sync_session
        assert isinstance(session, OutboxMixin)
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
    target: Connection | Session | AsyncSession | AsyncConnection,
    event: Any,
    *,
    type: str | None = None,
    destination: str | None = None,
    key: object = None,
    headers: Mapping[str, str] | None = None,
    delay: float | timedelta | None = None,
    message_id: UUID | None = None,
    correlation_id: str | None = None,
    notify: bool = True,
) -> UUID:
    """Publish ``event`` through ``target``; returns the message id.

    With a Core :class:`~sqlalchemy.engine.Connection`, the row is inserted now, in the
    connection's current transaction (commit it as usual; a rolled-back SAVEPOINT drops
    it). With an outbox session, this is ``session.publish(...)``. For an
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
