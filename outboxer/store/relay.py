"""SQL for the relay: claim a batch, settle its results, release, prune, measure backlog.

Claiming, in one short transaction (see docs/relay.md for the reasoning):

1. **Heads**: pending rows that are due, not leased, and have no earlier pending row with
   the same key (the claimer's own rows in flight excepted), found by a plain read
   (:func:`_heads`), then locked with ``FOR UPDATE SKIP LOCKED`` so two relays never
   take the same row. A row whose key has an earlier pending row is never a head, so a
   key's messages cannot be split between relays.
2. **Followers**: for the keys of those heads, the following pending rows, in id order,
   for as long as they are due and free: a key's run is taken as one piece, and stops
   before the first row that must wait (a delay, a backoff).
3. **Lease**: ``locked_by``/``locked_until`` on everything taken. A relay that dies
   leaves leases that expire; the rows are then claimable again.

SQLite has no row locks: it runs one relay, and the same statements work without them.
The statements of the hot path are built once per dialect (:func:`_statements`):
building SQLAlchemy constructs costs more than running them for small batches.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from ..message import Envelope
from ..tables import outbox
from ..tables import sent as sent_table
from .clock import clock_params, db_now, db_now_plus, later, now
from .dead_letters import NewDeadLetter, insert_dead_letters

__all__ = [
    "Backlog",
    "Claimed",
    "DeadLetterRow",
    "RetryRow",
    "backlog",
    "claim_batch",
    "next_due_in",
    "prune_sent",
    "release",
    "settle",
]

_KEPT_COLUMNS = (
    "id",
    "message_id",
    "message_type",
    "destination",
    "message_key",
    "payload",
    "headers",
    "content_type",
    "correlation_id",
    "causation_id",
    "traceparent",
    "tracestate",
    "target_handler",
    "occurred_at",
    "attempts",
)
"""What retention keeps of a sent row in ``outboxer_sent`` (plus ``sent_at``)."""


@dataclass(frozen=True)
class Claimed:
    """A leased outbox row: what to send, and its failure history so far."""

    id: int
    envelope: Envelope
    attempts: int
    """Failed send attempts before this claim."""
    first_failed_at: datetime | None


@dataclass(frozen=True)
class RetryRow:
    """Send again after ``delay`` seconds (on the database clock); counts an attempt."""

    id: int
    delay: float
    error: str


@dataclass(frozen=True)
class DeadLetterRow:
    """Move to ``outboxer_dead_letter`` with the reason; the outbox row is deleted."""

    claimed: Claimed
    error_type: str
    error: str
    attempts: int
    trace: Mapping[str, str] | None = None
    """The dead-letter span's context (a replay continues the trace from it)."""


@dataclass(frozen=True)
class Backlog:
    pending: int
    """Rows not yet sent (due or not)."""
    due: int
    """Rows due now."""
    oldest_due_seconds: float
    """How long the oldest due row has been waiting (0 when none is due)."""
    leased: int


def claim_batch(
    connection: Connection, *, owner: str, limit: int, lease_seconds: float
) -> list[Claimed]:
    """Lease up to ``limit`` due rows for ``owner``; returns them in id order.

    Rows under ``owner``'s own live lease do not hold back later rows of their key: a
    relay may claim the next rows of a key while it is still sending the earlier ones,
    because it sends its batches one after another. The relay changes its ``owner``
    token whenever a batch leaves its pipeline abnormally, so only rows really in flight
    count as its own. ``connection`` must not be in a transaction: the claim commits its
    own.
    """
    name = connection.dialect.name
    sql = _statements(name)
    clock = clock_params(name, lease=lease_seconds)
    # PostgreSQL: every step is one atomic statement (a follower cannot be taken by
    # another relay once its head is leased), so no transaction and no BEGIN/COMMIT
    # round trips.
    with _autocommit(connection) if name == "postgresql" else connection.begin():
        window = max(4 * limit, 1000)
        heads: Sequence[Any] = connection.execute(
            sql.heads, {"limit": limit, "window": window, "owner": owner, **clock}
        ).all()
        if not heads:
            return []
        if sql.lock_and_lease is not None:
            # PostgreSQL: lock (SKIP LOCKED) and lease the heads in one statement.
            rows = list(
                connection.execute(
                    sql.lock_and_lease, {"ids": [h.id for h in heads], "owner": owner, **clock}
                ).all()
            )
            head_of = {row.message_key: row.id for row in rows if row.message_key is not None}
            budget = limit - len(rows)
            if head_of and budget > 0:
                more = _followers(connection, sql, head_of, budget, clock)
                if more:
                    rows.extend(
                        connection.execute(
                            sql.lease_returning, {"ids": more, "owner": owner, **clock}
                        ).all()
                    )
        else:
            if name != "sqlite":  # SQLite runs one relay and has no row locks
                key_of = {row.id: row.message_key for row in heads}
                locked = connection.execute(sql.lock, {"ids": list(key_of), **clock}).scalars()
                heads = [_Head(row_id, key_of[row_id]) for row_id in sorted(locked)]
                if not heads:
                    return []
            ids = [row.id for row in heads]
            head_of = {row.message_key: row.id for row in heads if row.message_key is not None}
            budget = limit - len(ids)
            if head_of and budget > 0:
                ids.extend(_followers(connection, sql, head_of, budget, clock))
            connection.execute(sql.lease, {"ids": ids, "owner": owner, **clock})
            rows = list(connection.execute(sql.read, {"ids": ids}).all())
    claimed = [_claimed(row) for row in rows]
    claimed.sort(key=lambda c: c.id)
    return claimed


@contextlib.contextmanager
def _autocommit(connection: Connection) -> Iterator[None]:
    """Run single-statement steps without a transaction, then put the connection back."""
    connection.execution_options(isolation_level="AUTOCOMMIT")
    try:
        yield
    finally:
        connection.commit()  # ends SQLAlchemy's marker; nothing to commit in the database
        connection.execution_options(isolation_level=connection.default_isolation_level)


@dataclass(frozen=True)
class _Head:
    id: int
    message_key: str | None


def _followers(
    connection: Connection,
    sql: _Statements,
    head_of: dict[str, int],
    budget: int,
    clock: dict[str, Any],
) -> list[int]:
    """The rows after each head, in id order, while they are due and free."""
    rows = connection.execute(
        sql.followers,
        {
            "keys": list(head_of),
            "after": min(head_of.values()),
            "limit": budget + len(head_of),
            **clock,
        },
    ).all()
    taken: list[int] = []
    stopped: set[str] = set()
    for row in rows:
        key = row.message_key
        if row.id <= head_of[key] or key in stopped:
            continue
        if not row.ready:
            stopped.add(key)  # everything after it waits too: order within the key
            continue
        taken.append(row.id)
        if len(taken) >= budget:
            break
    return taken


def settle(
    connection: Connection,
    *,
    owner: str,
    sent: Sequence[int] = (),
    retry: Sequence[RetryRow] = (),
    dead: Sequence[DeadLetterRow] = (),
    release_ids: Sequence[int] = (),
    keep_sent: bool = False,
) -> None:
    """Record a batch's results in one transaction.

    Sent rows are deleted (or, with ``keep_sent``, moved to ``outboxer_sent`` for retention);
    retried rows get an attempt, their error and a later due time; dead rows move to the
    dead-letter table; released rows are handed back untouched.
    """
    name = connection.dialect.name
    sql = _statements(name)
    if name == "postgresql" and sent and not (retry or dead or release_ids or keep_sent):
        # The common case, one DELETE: atomic alone, no transaction round trips.
        with _autocommit(connection):
            connection.execute(sql.delete, {"ids": list(sent)})
        return
    with connection.begin():
        if sent:
            if keep_sent:
                connection.execute(sql.keep, {"ids": list(sent), **clock_params(name)})
                if sql.keep_moves_only:
                    connection.execute(sql.delete, {"ids": list(sent)})
            else:
                connection.execute(sql.delete, {"ids": list(sent)})
        if retry:
            connection.execute(
                sql.retry,
                [
                    {
                        "row_id": r.id,
                        "owner": owner,
                        "error": r.error,
                        **clock_params(name, delay=r.delay),
                    }
                    for r in retry
                ],
            )
        if dead:
            insert_dead_letters(
                connection,
                [
                    NewDeadLetter(
                        origin="relay",
                        envelope=_with_trace(d.claimed.envelope, d.trace),
                        error_type=d.error_type,
                        error_message=d.error,
                        attempts=d.attempts,
                        handler=d.claimed.envelope.handler,
                        first_failed_at=d.claimed.first_failed_at,
                    )
                    for d in dead
                ],
            )
            connection.execute(sql.delete, {"ids": [d.claimed.id for d in dead]})
        if release_ids:
            connection.execute(sql.release, {"ids": list(release_ids), "owner": owner})


def release(connection: Connection, *, owner: str, ids: Sequence[int]) -> None:
    """Hand leased rows back without counting an attempt (shutdown, broker outage)."""
    if ids:
        with connection.begin():
            connection.execute(
                _statements(connection.dialect.name).release, {"ids": list(ids), "owner": owner}
            )


def next_due_in(connection: Connection) -> float | None:
    """Seconds until the next pending row is due (0 if one is due now; None if none)."""
    current_time = db_now(connection.dialect)
    with connection.begin():
        row = connection.execute(select(func.min(outbox.c.available_at), current_time)).one()
    due: datetime | None = row[0]
    current: datetime = row[1]
    if due is None:
        return None
    return max(0.0, (due - current).total_seconds())


def prune_sent(connection: Connection, *, older_than: float, limit: int = 1000) -> int:
    """Delete up to ``limit`` kept rows sent more than ``older_than`` seconds ago."""
    dialect = connection.dialect
    old = sent_table.c.sent_at < db_now_plus(dialect, -older_than)
    with connection.begin():
        if dialect.name in ("mysql", "mariadb"):
            stmt = delete(sent_table).where(old).with_dialect_options(mysql_limit=limit)
        else:
            oldest = select(sent_table.c.id).where(old).order_by(sent_table.c.sent_at).limit(limit)
            stmt = delete(sent_table).where(sent_table.c.id.in_(oldest))
        return connection.execute(stmt).rowcount or 0


def backlog(connection: Connection) -> Backlog:
    """Pending, due and leased counts, and the age of the oldest due row."""
    current_time = db_now(connection.dialect)
    is_due = outbox.c.available_at <= current_time
    with connection.begin():
        row = connection.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((is_due, 1), else_=0)), 0),
                func.min(case((is_due, outbox.c.available_at))),
                func.coalesce(
                    func.sum(case((outbox.c.locked_until > current_time, 1), else_=0)), 0
                ),
                current_time,
            )
        ).one()
    count, due, oldest, leased, current = row
    age = (current - oldest).total_seconds() if oldest is not None else 0.0
    return Backlog(int(count), int(due), max(0.0, age), int(leased))


# The statements, built once per dialect --------------------------------------------------


@dataclass(frozen=True)
class _Statements:
    heads: Any
    lock: Any
    lock_and_lease: Any | None
    followers: Any
    lease: Any
    lease_returning: Any
    read: Any
    delete: Any
    keep: Any
    keep_moves_only: bool
    """True when ``keep`` copies the rows and ``delete`` must follow (no DML in CTEs)."""
    retry: Any
    release: Any


_SENT_COLUMNS = (
    outbox.c.id,
    outbox.c.message_id,
    outbox.c.message_type,
    outbox.c.destination,
    outbox.c.payload,
    outbox.c.occurred_at,
    outbox.c.message_key,
    outbox.c.correlation_id,
    outbox.c.causation_id,
    outbox.c.headers,
    outbox.c.traceparent,
    outbox.c.tracestate,
    outbox.c.content_type,
    outbox.c.target_handler,
    outbox.c.handler_attempt,
    outbox.c.attempts,
    outbox.c.first_failed_at,
)
"""What a claim reads back: the envelope and the failure history (the relay's hot path)."""


@cache
def _statements(name: str) -> _Statements:
    current = now(name)
    free = or_(outbox.c.locked_until.is_(None), outbox.c.locked_until < current)

    def by_ids(stmt: Any) -> Any:
        if name == "postgresql":
            return stmt.where(outbox.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
        return stmt.where(outbox.c.id.in_(bindparam("ids", expanding=True)))

    lease = by_ids(update(outbox)).values(
        locked_by=bindparam("owner"), locked_until=later(name, "lease")
    )
    still_free = (outbox.c.available_at <= current, free)
    lock = (
        select(outbox.c.id)
        .where(outbox.c.id.in_(bindparam("ids", expanding=True)), *still_free)
        .with_for_update(skip_locked=True)
    )
    lock_and_lease = None
    if name == "postgresql":
        locked = (
            select(outbox.c.id)
            .where(outbox.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))), *still_free)
            .with_for_update(skip_locked=True)
        )
        lock_and_lease = (
            update(outbox)
            .where(outbox.c.id.in_(locked.scalar_subquery()))
            .values(locked_by=bindparam("owner"), locked_until=later(name, "lease"))
            .returning(*_SENT_COLUMNS)
        )
    return _Statements(
        heads=_heads(name),
        lock=lock,
        lock_and_lease=lock_and_lease,
        followers=select(
            outbox.c.id,
            outbox.c.message_key,
            and_(outbox.c.available_at <= current, free).label("ready"),
        )
        .where(
            outbox.c.message_key.in_(bindparam("keys", expanding=True)),
            outbox.c.id > bindparam("after", type_=BigInteger()),
        )
        .order_by(outbox.c.id)
        .limit(bindparam("limit", type_=BigInteger())),
        lease=lease,
        lease_returning=lease.returning(*_SENT_COLUMNS),
        read=select(*_SENT_COLUMNS).where(outbox.c.id.in_(bindparam("ids", expanding=True))),
        delete=by_ids(delete(outbox)),
        keep=_keep(name, by_ids, current),
        keep_moves_only=name != "postgresql",
        retry=update(outbox)
        .where(outbox.c.id == bindparam("row_id"), outbox.c.locked_by == bindparam("owner"))
        .values(
            attempts=outbox.c.attempts + 1,
            last_error=bindparam("error"),
            first_failed_at=func.coalesce(outbox.c.first_failed_at, current),
            available_at=later(name, "delay"),
            locked_by=None,
            locked_until=None,
        ),
        release=by_ids(update(outbox))
        .where(outbox.c.locked_by == bindparam("owner"))
        .values(locked_by=None, locked_until=None),
    )


def _keep(name: str, by_ids: Any, current: Any) -> Any:
    """Retention: copy sent rows to ``outboxer_sent`` (PostgreSQL: move, in one statement)."""
    names = list(_KEPT_COLUMNS)
    if name == "postgresql":
        moved = by_ids(delete(outbox)).returning(*(outbox.c[n] for n in names)).cte("moved")
        rows = select(*(moved.c[n] for n in names), current)
    else:
        rows = by_ids(select(*(outbox.c[n] for n in names), current))
    return insert(sent_table).from_select([*names, "sent_at"], rows)


def _heads(name: str) -> Any:
    """Heads among the first ``window`` free, due rows in due order (a plain read).

    Looking only at a window keeps a claim's cost proportional to the batch, not to the
    backlog (with few keys almost every pending row is a follower, and a full scan would
    test them all). Every key's head enters the window as earlier rows are sent; leased
    rows are outside it, so a second relay's window moves past the keys the first holds.

    Within the window only a key's first row (its smallest id) can be its head, and the
    index is asked about those alone: "is it the smallest pending id of its key?", with
    ``ORDER BY id LIMIT 1`` so that only the ``(message_key, id)`` index answers it
    well. The plan stays good before the table has statistics (a fresh table, a burst),
    when a planner guessing one row per step would otherwise pick nested scans.
    """
    current = now(name)
    window = (
        select(outbox.c.id, outbox.c.message_key, outbox.c.available_at)
        .where(
            outbox.c.available_at <= current,
            or_(outbox.c.locked_until.is_(None), outbox.c.locked_until < current),
        )
        .order_by(outbox.c.available_at, outbox.c.id)
        .limit(bindparam("window", type_=BigInteger()))
        .subquery("w")
    )
    ranked = select(
        window.c.id,
        window.c.message_key,
        window.c.available_at,
        func.min(window.c.id).over(partition_by=window.c.message_key).label("first_id"),
    ).subquery("r")
    p = outbox.alias("p")
    first_of_key = (
        select(p.c.id)
        .where(
            p.c.message_key == ranked.c.message_key,
            # The claimer's own rows in flight do not count (see claim_batch).
            or_(
                p.c.locked_by.is_(None),
                p.c.locked_by != bindparam("owner"),
                p.c.locked_until < current,
            ),
        )
        .order_by(p.c.id)
        .limit(1)
        .scalar_subquery()
    )
    return (
        select(ranked.c.id, ranked.c.message_key)
        .where(
            or_(
                ranked.c.message_key.is_(None),
                and_(ranked.c.id == ranked.c.first_id, ranked.c.id == first_of_key),
            )
        )
        .order_by(ranked.c.available_at, ranked.c.id)
        .limit(bindparam("limit", type_=BigInteger()))
    )


def _with_trace(envelope: Envelope, trace: Mapping[str, str] | None) -> Envelope:
    if not trace:
        return envelope
    return replace(
        envelope, traceparent=trace.get("traceparent"), tracestate=trace.get("tracestate")
    )


def _claimed(row: Any) -> Claimed:
    (
        row_id,
        message_id,
        message_type,
        destination,
        payload,
        occurred_at,
        key,
        correlation_id,
        causation_id,
        headers,
        traceparent,
        tracestate,
        content_type,
        handler,
        attempt,
        attempts,
        first_failed_at,
    ) = row
    envelope = Envelope(
        message_id=message_id,
        type=message_type,
        destination=destination,
        payload=bytes(payload),
        occurred_at=occurred_at,
        key=key,
        correlation_id=correlation_id,
        causation_id=causation_id,
        headers=json.loads(headers) if headers else {},
        traceparent=traceparent,
        tracestate=tracestate,
        content_type=content_type,
        handler=handler,
        attempt=attempt,
    )
    return Claimed(row_id, envelope, attempts, first_failed_at)
