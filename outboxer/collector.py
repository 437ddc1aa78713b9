"""The collector: messages a session keeps until its transaction commits, and the session
hooks that write them into that transaction or drop them with it.

``session.publish(event)`` does no I/O: it serializes the event and keeps it in the
session (an attribute of the session object, not ``session.info``, which ``Session(info=...)``
copies into other sessions), with the innermost transaction open at that moment. Session
events then decide its fate. The hooks' contract:

* **Write when the outermost transaction commits, and only then**, after the session is
  flushed (the last domain writes have taken their row locks, so transactions that touch
  the same rows get outbox ids in commit order): one multi-row INSERT (and, on
  PostgreSQL, one NOTIFY) in that same transaction, just before its COMMIT.

  ``before_commit`` does not say which transaction commits. It fires for the outermost
  transaction and for every SAVEPOINT released, and a commit that still has SAVEPOINTs
  open fires it first for the committing transaction, then once more for each open
  SAVEPOINT as it releases it, innermost first (``SessionTransaction._prepare_impl``).
  So: ``before_commit`` with no SAVEPOINT open is the outermost commit (write now).
  ``before_commit`` with SAVEPOINT S innermost is S's release or an enclosing commit; the
  hooks count these per SAVEPOINT, and a SAVEPOINT whose release (``after_commit``) saw
  two of them was released by an enclosing commit, which they then follow outwards. When
  that reaches the outermost transaction, the write happens as the last SAVEPOINT closes
  (``after_transaction_end``), still before the outermost transaction's COMMIT. Messages
  published by ``before_flush`` listeners during that flush join the INSERT; a message
  published after it, during the same commit (by a ``before_commit`` listener registered
  after outboxer's, say), is written through at once.
* ``after_soft_rollback`` of a SAVEPOINT drops the messages published inside it (and
  inside SAVEPOINTs nested in it, released or not); a rollback of the whole transaction
  drops them all.
* ``after_transaction_end`` of the outermost transaction forgets whatever is left (a
  session closed without commit stores nothing).

With the collector off (``outboxer_collector = False``), ``publish()`` also writes the kept
messages every ``outboxer_chunk_size`` of them, into the innermost transaction, and
``begin_nested()`` writes them before its SAVEPOINT (they belong outside it): the database
then keeps or drops them with their transaction, as for Core. While messages kept
from an enclosing transaction remain (the collector was switched off inside a SAVEPOINT),
no chunk is written until that SAVEPOINT ends: its rollback must not drop them, and the
outbox ids must follow publish order.

A session joined to an external connection (``Session(bind=connection,
join_transaction_mode=...)``) writes at its commit into the connection's transaction, so
the external transaction's commit or rollback decides, as it does for the domain rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, UnboundExecutionError
from sqlalchemy.orm import Session, SessionTransaction

from . import store
from .errors import ConfigurationError
from .store.outbox import inserted_prefix
from .tables import outbox
from .write_checks import (
    ACTIVE,
    AUTOCOMMIT,
    ENDED,
    FOREIGN_SAVEPOINT,
    MYSQL,
    autocommit,
    check_writing,
    watch_for_lost_transactions,
)

__all__ = [
    "RECORDED",
    "Pending",
    "committing",
    "install_hooks",
    "keep",
    "kept",
    "write_before_savepoint",
]

_PENDING = "outboxer.pending"
# Lets a Session with several binds pick the engine that holds the outbox table.
_BIND_ARGUMENTS = {"clause": outbox.insert()}
_CHUNK_BYTES = 8 * 1024 * 1024  # collector off: write at this much payload, whatever the count


@dataclass
class Pending:
    message: store.NewMessage
    transaction: SessionTransaction
    """The innermost transaction open at publish() time."""


# Session hooks ---------------------------------------------------------------------------
_STATE = "_outboxer_state"


def session_state(session: Session) -> dict[str, Any]:
    """The collector's state of ``session``: its own dict, kept on the session object.

    Not ``session.info``: ``Session(info=other.info)`` (passing a request's context on
    to a second session) copies that dict's entries, so the second session shared the
    first one's list of kept messages, and its commit stored them (a rolled-back
    transaction's messages committed, and each stored by the wrong session's commit).
    """
    try:
        state: dict[str, Any] = session.__dict__[_STATE]
    except KeyError:
        state = session.__dict__[_STATE] = {}
    return state


_BEFORE_COMMITS = "outboxer.before_commits"
"""SAVEPOINT -> how many ``before_commit`` events fired while it was the innermost one."""
_WRITE_AT_END = "outboxer.write_at_end"
"""The SAVEPOINT whose closing ends an enclosing commit's releases: write then."""
_PENDING_BYTES = "outboxer.pending_bytes"
"""Payload bytes kept in _PENDING (counted when the collector is off)."""
_WRITTEN = "outboxer.written"
"""Set once this commit wrote the outbox: later publish() calls write through."""
_HELD = "outboxer.held"
"""The innermost transaction in which the kept messages cannot be written (the first of
them belongs to a transaction around it): chunks wait until it ends."""
_UNSURE = "outboxer.unsure"
"""Set when an outbox INSERT raised after it may have run: the next write first looks
which kept messages the transaction holds already. Cleared by the outermost end."""
_NO_TRANSACTION = "outboxer.no_transaction"
"""Set by ``after_begin`` when a connection of this transaction is in AUTOCOMMIT."""
RECORDED = "outboxer.recorded"
"""While ``outboxer.testing`` records, a list in the session's :func:`session_state`:
every INSERT of kept messages appends them (their ``Pending``); the outermost
transaction's end removes it."""


def install_hooks(session_class: type[Session]) -> None:
    event.listen(session_class, "after_begin", _after_begin)
    event.listen(session_class, "before_commit", _before_commit)
    event.listen(session_class, "after_commit", _after_commit)
    event.listen(session_class, "after_soft_rollback", _after_soft_rollback)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)


def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    # MariaDB: learn max_allowed_packet (once per engine), so publish() can refuse a
    # message that cannot fit before it is kept.
    store.learn_statement_limit(connection)
    # Known once per connection (its isolation level cannot change inside a transaction),
    # so that publish() need not ask again.
    if autocommit(connection):
        session_state(session)[_NO_TRANSACTION] = True
    if connection.dialect.name in MYSQL:
        watch_for_lost_transactions(connection, transaction)


def _before_commit(session: Session) -> None:
    savepoint = session.get_nested_transaction()
    if savepoint is None:
        _write_pending(session)  # the outermost transaction commits
        return
    # This SAVEPOINT is being released, or an enclosing transaction commits and will
    # release it first (this event then fires again for it): count, decide at release.
    counts: dict[SessionTransaction, int] = session_state(session).setdefault(_BEFORE_COMMITS, {})
    counts[savepoint] = counts.get(savepoint, 0) + 1


def _after_commit(session: Session) -> None:
    savepoint = session.get_nested_transaction()  # still set while its release completes
    if savepoint is None:
        return  # the outermost COMMIT is done
    counts: dict[SessionTransaction, int] | None = session_state(session).get(_BEFORE_COMMITS)
    if not counts or counts.pop(savepoint, 0) < 2:
        return  # it was released by itself (or by the commit of this very savepoint)
    # Released by an enclosing transaction's commit: pass that commit's count outwards.
    parent = savepoint.parent
    if parent is not None and parent.nested:
        counts[parent] = counts.get(parent, 0) + 1
    else:
        session_state(session)[_WRITE_AT_END] = savepoint  # the outermost transaction commits next


def _write_pending(session: Session) -> None:
    # Messages published by listeners during this flush (before_flush) join this INSERT;
    # those published after it, during the rest of the commit, are written through.
    _insert_pending(session, flush=True)
    state = session_state(session)
    while state.get(_PENDING):
        # Published while the INSERT awaited the database, by another task sharing an
        # AsyncOutboxSession (publish() does no I/O, so SQLAlchemy's guard against
        # concurrent tasks does not stop it): write them too, before the COMMIT. They
        # used to stay kept, and the end of the transaction dropped them.
        _insert_pending(session, flush=False)
    state[_WRITTEN] = True


def _insert_pending(
    session: Session, *, flush: bool, within: SessionTransaction | None = None
) -> None:
    """INSERT the kept messages in the innermost transaction, and forget them.

    ``flush``: flush the session first, so domain writes take their row locks before
    outbox ids are assigned (skipped when the session is flushing already: a listener
    publishing from inside a flush). ``within``: the innermost transaction, for a chunk
    (None: the outermost commit, which writes everything).

    A chunk writes only when every kept message belongs inside ``within``. Messages of a
    transaction around it (the collector was switched off inside a SAVEPOINT) cannot go
    into it (its rollback would drop them), and writing the later ones first would give
    them smaller ids than messages published before them (a key's order): everything
    waits until ``within`` ends. Kept messages are in publish order, so the first one
    decides: every later one was published in ``within`` or inside it, or earlier.
    """
    state = session_state(session)
    kept: list[Pending] | None = state.get(_PENDING)
    if kept and within is not None and not inside(kept[0].transaction, within):
        state[_HELD] = within
        return
    if flush and not _flushing(session):
        session.flush()
    pending: list[Pending] | None = state.get(_PENDING)
    state.pop(_PENDING_BYTES, None)
    if not pending:
        return
    connection = session.connection(bind_arguments=_BIND_ARGUMENTS)
    check_writing(connection, session)
    notify = getattr(session, "outboxer_notify", True)
    recorded: list[Pending] | None = session_state(session).get(RECORDED)

    def forget(stored: int) -> None:
        # Only once stored: a failed INSERT keeps them for a retry.
        if recorded is not None:
            recorded.extend(pending[:stored])
        del pending[:stored]

    if state.pop(_UNSURE, False):
        # One SELECT, on a commit tried again after such an error only.
        forget(inserted_prefix(connection, [p.message for p in pending]))
        if not pending:
            return
    messages = [p.message for p in pending]
    try:
        store.insert_messages(connection, messages, notify=notify, inserted=forget)
    except DBAPIError:
        raise  # the database refused the statement: it stored none of its rows
    except BaseException:
        # Raised after the statement may have run (an after_cursor_execute listener, an
        # error reading its result): the rows may be in the transaction while the session
        # still keeps them. A commit tried again looks first, instead of inserting twice.
        state[_UNSURE] = True
        raise


def _flushing(session: Session) -> bool:
    # SQLAlchemy has no public "flush in progress"; Session._flushing is what flush()
    # itself checks before refusing to run twice.
    return bool(getattr(session, "_flushing", False))


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.nested or previous_transaction.parent is None:
        _forget_commit(session)  # a rollback ends any commit in progress
    if previous_transaction.parent is None:
        # (a SAVEPOINT's rollback leaves these)
        for name in (_UNSURE, _NO_TRANSACTION):
            session_state(session).pop(name, None)
    pending: list[Pending] | None = session_state(session).get(_PENDING)
    if not pending:
        return
    if previous_transaction.nested:
        pending[:] = [p for p in pending if not inside(p.transaction, previous_transaction)]
        session_state(session)[_PENDING_BYTES] = sum(
            len(p.message.envelope.payload) for p in pending
        )
    elif previous_transaction.parent is None:
        pending.clear()
    # else: an internal flush subtransaction; the SAVEPOINT or outermost transaction it
    # belongs to gets its own rollback event.


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        if session_state(session).get(_WRITE_AT_END) is transaction:
            del session_state(session)[_WRITE_AT_END]
            _write_pending(session)  # the outermost transaction, now innermost, commits
    elif transaction.parent is None:
        _forget_commit(session)
        for name in (_UNSURE, _NO_TRANSACTION):
            session_state(session).pop(name, None)
        session_state(session).pop(RECORDED, None)
        pending = session_state(session).get(_PENDING)
        if pending:
            pending.clear()


def _forget_commit(session: Session) -> None:
    for name in (_BEFORE_COMMITS, _WRITE_AT_END, _WRITTEN, _PENDING_BYTES, _HELD):
        session_state(session).pop(name, None)


def inside(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    """Whether ``transaction`` is ``ancestor`` or nested (at any depth) inside it."""
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def _check_size(session: Session, message: store.NewMessage) -> Engine | Connection | None:
    """Raise MessageTooLarge when ``message`` cannot be stored; the bind of the outbox."""
    try:
        bind = session.get_bind(clause=_BIND_ARGUMENTS["clause"])
    except UnboundExecutionError:
        # binds= for the application's tables only (``Session.binds`` in newer SQLAlchemy
        # releases, ``_Session__binds`` in older ones): the commit would fail with
        # SQLAlchemy's "Could not locate a bind", naming neither table nor fix.
        if getattr(session, "binds", None) or getattr(session, "_Session__binds", None):
            raise ConfigurationError(
                "this session has no database for outboxer's tables (outboxer_outbox): its "
                "binds= cover other tables only; add outboxer's, e.g. sessionmaker(binds="
                "{Base: engine, **dict.fromkeys(outboxer.metadata.sorted_tables, engine)})"
            ) from None
        return None  # no database yet: the commit will say so, as for Session.add()
    store.check_size(message, bind.engine if isinstance(bind, Connection) else bind)
    return bind


def keep(session: Session, message: store.NewMessage, *, collector: bool, chunk_size: int) -> None:
    """Keep ``message`` in ``session`` until its transaction commits (``publish()``).

    Autobegins like ``Session.add()`` does (no I/O: no connection is checked out yet), so
    a rollback() right after publish() drops the message the same way it drops adds.
    ``collector`` False: write the kept messages every ``chunk_size`` of them.
    """
    bind = _check_size(session, message)
    transaction = session.get_nested_transaction() or session._autobegin_t()
    if transaction._state is not ACTIVE and transaction._state in ENDED:
        raise ConfigurationError(ENDED[transaction._state])
    state = session_state(session)
    connections = transaction._connections
    if connections:
        if _NO_TRANSACTION in state:  # seen by _after_begin
            raise ConfigurationError(f"this session's connection {AUTOCOMMIT}")
        for entry in connections.values():  # (connection, its transaction, ...)
            nested = entry[0]._nested_transaction
            if nested is not None and nested is not entry[1]:
                raise ConfigurationError(FOREIGN_SAVEPOINT)
    elif bind is not None and autocommit(bind):  # no connection yet: the bind's setting
        raise ConfigurationError(f"this session's database {AUTOCOMMIT}")
    pending = state.setdefault(_PENDING, [])
    pending.append(Pending(message, transaction))
    if state.get(_WRITTEN):
        # Published during the commit, after its write (a before_commit listener that
        # runs after outboxer's): the transaction is still open, write it through.
        _insert_pending(session, flush=False)
    elif not collector:
        size = state.get(_PENDING_BYTES, 0) + len(message.envelope.payload)
        state[_PENDING_BYTES] = size
        full = len(pending) >= chunk_size or size >= _CHUNK_BYTES
        if full and state.get(_HELD) is not transaction:
            # Into the innermost transaction, when they all belong to it (a SAVEPOINT's
            # begin writes those of the transaction around it first).
            _insert_pending(session, flush=True, within=transaction)


def write_before_savepoint(session: Session) -> None:
    """With the collector off: a SAVEPOINT about to begin first writes the messages kept
    so far, which belong to the transaction around it."""
    innermost = session.get_nested_transaction() or session.get_transaction()
    _insert_pending(session, flush=True, within=innermost)


def committing(session: Session) -> bool:
    """Whether ``session``'s commit has written its messages and is finishing (its
    COMMIT under way): a publish() now must be written at once, with I/O."""
    return bool(session_state(session).get(_WRITTEN))


def kept(session: Session) -> list[store.NewMessage]:
    """The messages ``session`` keeps for its next commit."""
    return [p.message for p in session_state(session).get(_PENDING, ())]
