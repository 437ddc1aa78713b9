"""What refuses a write of an outbox session's messages: where they could not be stored
with the transaction they were published in, publish() (or the commit) raises, naming the
fix, instead of storing or dropping them silently.

* AUTOCOMMIT isolation (the engine's, a connection's, pysqlite's own mode): there is no
  transaction to join;
* a transaction that has ended (publish() from an ``after_commit`` or ``after_rollback``
  listener, or after a failed flush);
* a SAVEPOINT begun on the session's connection instead of ``session.begin_nested()``;
* on MariaDB/MySQL, a transaction the database rolled back by itself (a deadlock the
  application caught): the server begins a new one, whose COMMIT would store the messages
  of rows that are gone.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionState

from .errors import ConfigurationError, OutboxerError

__all__ = [
    "ACTIVE",
    "AUTOCOMMIT",
    "ENDED",
    "FOREIGN_SAVEPOINT",
    "MYSQL",
    "autocommit",
    "check_writing",
    "watch_for_lost_transactions",
]

MYSQL = frozenset({"mysql", "mariadb"})
_LOST = "outboxer.transaction_lost"
"""In ``connection.info`` (MariaDB/MySQL): the database rolled the whole transaction back."""
_watched: weakref.WeakSet[Engine] = weakref.WeakSet()
_LOST_MESSAGE = (
    "the database rolled this transaction back (on MariaDB/MySQL a deadlock ends the "
    "whole transaction, not only the statement or the SAVEPOINT that hit it, and the next "
    "statement begins a new one): the rows written before it are gone, so the messages "
    "published with them cannot be stored. Roll back (session.rollback()) and run the "
    "whole transaction again"
)


def watch_for_lost_transactions(connection: Connection, transaction: SessionTransaction) -> None:
    """MariaDB/MySQL: note on the connection when an error ended its whole transaction.

    InnoDB rolls the whole transaction back on a deadlock (1213), inside a SAVEPOINT
    too, whose ROLLBACK TO (or RELEASE) SAVEPOINT then fails (1305). A caller that
    catches the error and goes on writes into a new transaction the server began: its COMMIT
    stored the messages published before the deadlock while their rows were gone. The
    write at commit now refuses (``check_writing``). One ``handle_error`` listener per
    engine, called on errors only; the mark is cleared when a session transaction begins.
    """
    engine = connection.engine
    if engine not in _watched:
        event.listen(engine, "handle_error", _note_lost_transaction)
        _watched.add(engine)
    if transaction.parent is None:
        connection.info.pop(_LOST, None)


def _note_lost_transaction(context: Any) -> None:
    error = context.original_exception
    args = getattr(error, "args", None)
    code = args[0] if isinstance(args, tuple) and args else None
    if code == 1213 or (
        # 1305 is also "FUNCTION ... does not exist": only a SAVEPOINT statement's counts
        code == 1305 and "SAVEPOINT" in str(context.statement or "").upper()
    ):
        connection = context.connection
        if connection is not None and not (connection.closed or connection.invalidated):
            with contextlib.suppress(Exception):  # never replace the application's error
                connection.info[_LOST] = True


ACTIVE = SessionTransactionState.ACTIVE
ENDED = {
    SessionTransactionState.COMMITTED: (
        "publish() after this session's transaction committed (from an after_commit "
        "listener?): the message could no longer be stored with it. Publish before the "
        "commit (in a before_commit listener, say), or once commit() has returned, in the "
        "session's next transaction"
    ),
    SessionTransactionState.DEACTIVE: (
        "publish() in a transaction that has been rolled back (from an after_rollback "
        "listener, or after a failed flush): the message could never be stored. Call "
        "session.rollback() (or the SAVEPOINT's rollback()) first, then publish in the "
        "next transaction"
    ),
}
"""Why publish() is refused in a transaction in this state: the message used to be kept
and silently dropped (after_rollback), or failed with SQLAlchemy's generic error."""

AUTOCOMMIT = (
    "runs in AUTOCOMMIT isolation (isolation_level='AUTOCOMMIT' on its engine or "
    "connection, or in the session's execution_options): every statement commits on its "
    "own, so there is no transaction for the messages to join, and a rollback would keep "
    "the rows flushed so far and drop their messages. Publish through a session whose "
    "engine has a transactional isolation level (e.g. engine.execution_options("
    "isolation_level='READ COMMITTED'))"
)
FOREIGN_SAVEPOINT = (
    "publish() inside a SAVEPOINT begun on the session's connection "
    "(session.connection().begin_nested()): the session does not see it end, so its "
    "rollback would not drop the message (nor would its release keep the outbox order). "
    "Begin the SAVEPOINT with session.begin_nested() instead"
)


def check_writing(conn: Connection, session: Session) -> None:
    """Before an outbox INSERT: refuse a connection in AUTOCOMMIT (pysqlite's own mode
    included), a transaction the database rolled back by itself (MariaDB/MySQL), and a
    SAVEPOINT begun on the connection and still open when the session writes but does not
    commit the connection (``join_transaction_mode="rollback_only"``): the messages would
    go inside it, and its rollback by the code around the session would drop them while
    the rows flushed before it stayed. (A session that commits releases it with its
    COMMIT or its own RELEASE.)"""
    if conn.dialect.name in MYSQL and conn.info.get(_LOST):
        raise OutboxerError(_LOST_MESSAGE)
    if autocommit(conn):
        raise ConfigurationError(f"this session's connection {AUTOCOMMIT}")
    nested = conn._nested_transaction
    if nested is None:
        return
    innermost = session.get_nested_transaction() or session.get_transaction()
    own = innermost._connections.get(conn) if innermost is not None else None
    if own is None or nested is own[1]:
        return
    root = session.get_transaction()
    entry = root._connections.get(conn) if root is not None else None
    if entry is None or not entry[2]:  # should_commit
        raise ConfigurationError(
            "the session writes its messages while a SAVEPOINT begun on its connection "
            "(connection.begin_nested()) is still open, and does not commit that connection "
            "itself (join_transaction_mode='rollback_only'): the messages would go inside "
            "that SAVEPOINT, and its rollback would drop them but not the rows flushed "
            "before it. Release or roll back that SAVEPOINT before session.commit()"
        )


def autocommit(bind: Connection | Engine) -> bool:
    if isinstance(bind, Connection):
        if bind._is_autocommit_isolation():  # SQLAlchemy's own test
            return True
        if bind.dialect.name == "sqlite" and not bind.closed:
            # pysqlite in its own autocommit mode (connect_args={"isolation_level": None}
            # or autocommit=True) without the BEGIN recipe: no transaction is open.
            dbapi = bind.connection.dbapi_connection
            autocommit = getattr(dbapi, "isolation_level", "") is None or (
                getattr(dbapi, "autocommit", False) is True
            )
            return autocommit and getattr(dbapi, "in_transaction", True) is False
        return False
    level = bind._execution_options.get("isolation_level")
    if level is None:
        level = bind.dialect._on_connect_isolation_level
    return bool(level == "AUTOCOMMIT")
