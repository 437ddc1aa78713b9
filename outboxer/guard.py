"""The handler's session while the handler runs: ``commit()``, ``rollback()`` and
``close()`` refused.

outboxer commits a handler's session, with its inbox row, when the handler returns; a
handler that committed or rolled back itself would split the inbox row from its work, and
one that closed the session would throw both away while its message counted as
processed. Each call raises :class:`~outboxer.errors.HandlerSessionError`
(dead-lettered at once).

A handler can end the transaction through doors no shadowing covers (``session.reset()``,
``session.invalidate()``, ``session.get_transaction().rollback()``): when the handler
returns, the transaction outboxer opened must still be the session's, and active; if not,
the run fails with the same error. So does a handler that caught an error from a flush
(an IntegrityError outside a savepoint) and went on, its error saying so.

The session's connection is guarded too: ``session.connection().commit()`` is refused
by a ``commit`` event listener on its engine, while the connection is marked as the
running handler's. (Its ``rollback()`` needs no guard: the session's transaction is then
inactive, and the run fails.) So is a transaction-control statement sent through it
(``session.execute(text("COMMIT"))``: ``COMMIT``, ``END``, ``ROLLBACK`` but not ``ROLLBACK
TO SAVEPOINT``, ``BEGIN``, ``START TRANSACTION``, ``SET autocommit``), by a
``before_cursor_execute`` listener: the database would commit the inbox rows behind
SQLAlchemy's back, and in a batch the rows of every message, whose handlers' later writes
were then lost to a rollback. A commit on the raw DBAPI connection, or a statement that
commits implicitly (MariaDB's DDL), cannot be seen and is the handler's own
responsibility.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .errors import HandlerSessionError
from .redaction import error_text

__all__ = ["guarded"]

_MARK = "outboxer.running_handler"
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_engines_lock = threading.Lock()


def _refuse_commit(connection: Connection) -> None:
    handler = connection.info.get(_MARK)
    if handler is not None:
        raise HandlerSessionError(
            f"{handler} committed its session's connection: outboxer commits the "
            "handler's session, with its inbox row, when the handler returns; remove the "
            "commit (use session.flush() to send the writes early)"
        )


_TRANSACTION_CONTROL = re.compile(
    r"""\A(?:\s+|--[^\n]*(?:\n|\Z)|\#[^\n]*(?:\n|\Z)|/\*.*?\*/|;)*  # blanks, comments
    (?:COMMIT|END|ABORT|BEGIN(?!\s+NOT\s+ATOMIC\b)|START\s+TRANSACTION
      |PREPARE\s+TRANSACTION|ROLLBACK(?!\s+(?:WORK\s+|TRANSACTION\s+)?TO\b)
      |SET\s+(?:@@(?:SESSION\.)?|SESSION\s+|LOCAL\s+)?AUTOCOMMIT)\b""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
"""A statement that ends (or begins) the transaction: the handler's inbox row with it."""


def _refuse_transaction_control(
    connection: Connection, cursor: Any, statement: str, *args: Any
) -> None:
    handler = connection.info.get(_MARK)
    if handler is not None and _TRANSACTION_CONTROL.match(statement):
        raise HandlerSessionError(
            f"{handler} sent a statement that ends its transaction "
            f"({statement.strip()[:40]!r}): outboxer commits the handler's session, with "
            "its inbox row, when the handler returns, and such a statement would commit the "
            "inbox row (in a batch, every message's) apart from the handler's work; remove "
            "it (use session.flush() to send the writes early, session.begin_nested() for "
            "a part that may fail)"
        )


def _watch(engine: Engine) -> None:
    """Listen for commits and transaction-control statements on ``engine`` (once per
    engine; a set lookup on each handler run after the first)."""
    if engine in _engines:
        return
    with _engines_lock:
        if engine in _engines:
            return
        event.listen(engine, "commit", _refuse_commit)
        event.listen(engine, "before_cursor_execute", _refuse_transaction_control)
        _engines.add(engine)


class guarded:
    """While the handler runs, its session refuses ``commit()``, ``rollback()`` and
    ``close()``, and its connection ``commit()``."""

    def __init__(self, session: Any, who: str) -> None:
        self.session = session
        self.who = who
        self.marks: dict[Any, Any] | None = None
        self.transaction: Any = None

    def __enter__(self) -> None:
        handler = self.who

        def commit() -> None:
            raise HandlerSessionError(
                f"{handler} called session.commit(): outboxer commits the handler's "
                "session, with its inbox row, when the handler returns; remove the commit "
                "(use session.flush() to send the writes early)"
            )

        def rollback() -> None:
            raise HandlerSessionError(
                f"{handler} called session.rollback(): raise an exception instead "
                "(the run is rolled back and retried), or use session.begin_nested() for a "
                "part that may fail on its own"
            )

        def close() -> None:
            raise HandlerSessionError(
                f"{handler} called session.close(): it would throw away the "
                "handler's work and its inbox row while the message counted as processed; "
                "remove the close (outboxer closes the session when the handler returns)"
            )

        # Instance attributes: they shadow the methods for this session only.
        setattr(self.session, "commit", commit)  # noqa: B010
        setattr(self.session, "rollback", rollback)  # noqa: B010
        setattr(self.session, "close", close)  # noqa: B010
        if self.session.in_transaction():  # a transactional handler's (never begins one)
            self.transaction = self.session.get_transaction()
            connection = self.session.connection()
            _watch(connection.engine)
            # The pooled connection's own dict: reachable in __exit__ whatever the handler
            # did to the session or the connection meanwhile.
            self.marks = connection.info
            self.marks[_MARK] = handler

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        for name in ("commit", "rollback", "close"):
            vars(self.session).pop(name, None)
        if self.marks is not None:
            self.marks.pop(_MARK, None)
        if exc_type is None and self.transaction is not None:
            ours = self.transaction
            failed = getattr(ours, "_rollback_exception", None)  # a flush that failed
            if self.session.get_transaction() is ours and failed is not None:
                raise HandlerSessionError(
                    f"{self.who} caught an error from a flush and went on "
                    f"({type(failed).__name__}: {error_text(failed)[:300]}): after it the "
                    "transaction can only roll back; let the error propagate, or make the "
                    "write that may fail in session.begin_nested() and catch it there"
                ) from failed
            if self.session.get_transaction() is not ours or not ours.is_active:
                raise HandlerSessionError(
                    f"{self.who} ended the transaction outboxer gave it (with "
                    "session.reset(), session.invalidate(), or a rollback or close of "
                    "session.get_transaction()): its work and its inbox row would be thrown "
                    "away while the message counted as processed; raise an exception instead"
                )
