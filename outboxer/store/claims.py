"""SQL for claiming a batch: heads, followers, leases, and parking the rows that must wait.

Claiming (see docs/relay.md, "Ordering", for the reasoning):

1. **Heads**: due, free rows (:mod:`outboxer.store.leases`) that no earlier pending row of
   their key holds back, found among the first ``window`` due rows by a plain read, then
   locked with ``FOR UPDATE SKIP LOCKED`` so two relays never take the same row.
2. **Followers**: for the keys of those heads, the following rows, in id order, for as
   long as they are due and free: a key's run is taken as one piece, and stops before the
   first row that must wait.
3. **Lease**: ``locked_by``/``locked_until`` on everything taken, under the batch's token.
4. **Sharing**, when several relays run: each looks first for heads among the keys of its
   own share (:func:`~outboxer.store.leases.in_share`), then, finding none, among all.
   Without it a key stays with the relay that first took it: that relay's rows in flight
   hold the key back for every other relay, and its next claim takes the key's next rows.
   The share only narrows where a claim looks; the rules above keep the order.
5. **Parking**, when the window held fewer heads than wanted: a key whose earliest pending
   row is not due (a delay, a backoff) cannot send any of its later rows before that row,
   so those rows get its due time. They leave the due window, which therefore never fills
   up with rows that cannot go, and other keys keep moving. A key whose earliest pending
   row is due and free but outside the window (its due time is later than its followers',
   after a backoff) has it taken as a head.

On PostgreSQL, steps 1 to 3 are one ``UPDATE ... RETURNING`` (:mod:`.claim_pg`); MariaDB
(no ``UPDATE ... RETURNING``) and SQLite run them one statement at a time.
SQLite has no row locks: it runs one relay, and the same statements work without them.
The statements are built once per dialect (:func:`_statements`): building SQLAlchemy
constructs costs more than running them for small batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import BigInteger, and_, any_, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from ..tables import outbox
from .claim_pg import claim_statement, run_raw
from .clock import clock_params, later, now
from .leases import LeaseScope, for_destinations, free, holds_back, in_share, is_in
from .relay import SENT_COLUMNS, Claimed, claimed_from_row

__all__ = ["autocommit", "claim_batch"]


def claim_batch(
    connection: Connection,
    *,
    owner: str,
    scope: LeaseScope,
    limit: int,
    lease_seconds: float,
    window: int | None = None,
    max_bytes: int | None = None,
) -> list[Claimed]:
    """Lease up to ``limit`` due rows under the token ``owner``; returns them in id order.

    ``max_bytes`` bounds the payload bytes of the batch (None: no bound): the rows taken
    stop before the one that would pass it, in id order (a prefix of every key's run, so
    the rows left stay behind the ones taken), the first row in any case.

    Heads are looked for among the first ``window`` due rows (default: 4 x ``limit``, at
    least 1,000). ``connection`` must not be in a transaction: the claim commits its own
    (PostgreSQL: every step is one atomic statement, so none is needed at all).
    """
    name = connection.dialect.name
    if scope.share is not None and name != "sqlite":
        # Several relays: take the keys of this relay's share first, so that a key does
        # not stick to the relay that happened to take it first. Nothing there: any key.
        shared = _claim(
            connection, name, scope, True, limit, lease_seconds, owner, window, max_bytes
        )
        if shared:
            return shared
    return _claim(connection, name, scope, False, limit, lease_seconds, owner, window, max_bytes)


def _claim(
    connection: Connection,
    name: str,
    scope: LeaseScope,
    shared: bool,
    limit: int,
    lease_seconds: float,
    owner: str,
    window: int | None,
    max_bytes: int | None,
) -> list[Claimed]:
    sql = _statements(name, scope.destinations is not None, shared)
    params = {**scope.params(), **clock_params(name, lease=lease_seconds)}
    params["owner"] = owner
    params["window"] = params["scan"] = window or max(4 * limit, 1000)
    params["excluded"] = []
    params["heads"] = params["limit"] = limit
    params["max_bytes"] = NO_BOUND if max_bytes is None else max_bytes
    params["alone"] = True  # a row larger than max_bytes goes alone
    with autocommit(connection) if name == "postgresql" else connection.begin():
        if sql.claim is not None:  # PostgreSQL: heads, lock, followers, lease: one statement
            rows = run_raw(connection, sql.claim, params)
        else:
            heads = [_Head(r.id, r.message_key) for r in connection.execute(sql.heads, params)]
            rows = _take(connection, sql, params, heads, limit) if heads else []
        left = params["max_bytes"] - sum(len(row[_PAYLOAD]) for row in rows)
        if len(rows) < limit and left > params["max_bytes"] // 2:
            # Room to spare (a claim stopped by its bytes has none: more than half of them
            # taken, or the next row would not fit).
            mine = None if scope.destinations is None else set(scope.destinations)
            looked = {**params, "max_bytes": left, "alone": False}
            rows += _second_look(connection, sql, looked, rows, limit - len(rows), mine)
    seen: dict[str, Any] = {}
    claimed = [claimed_from_row(row, seen) for row in rows]
    claimed.sort(key=lambda c: c.id)
    return claimed


_ID, _KEY, _PAYLOAD = (
    next(i for i, column in enumerate(SENT_COLUMNS) if column is wanted)
    for wanted in (outbox.c.id, outbox.c.message_key, outbox.c.payload)
)
"""Where a claimed row (:data:`~.relay.SENT_COLUMNS`) has its id, key and payload."""

NO_BOUND = 2**62
"""``max_bytes`` of a claim without a bound on its bytes."""

SECOND_LOOK_SCAN = 10
"""The second look at the due rows reaches this many windows deep."""


@dataclass(frozen=True)
class _Head:
    id: int
    message_key: str | None


def _second_look(
    connection: Connection,
    sql: _Statements,
    params: dict[str, Any],
    taken: list[Any],
    budget: int,
    mine: set[str] | None,
) -> list[Any]:
    """With room to spare, deal with the window's keys that have no head in it.

    A key whose earliest pending row is not due has its later rows parked; one whose
    earliest row is due and free but outside the window has it taken as a head, if it goes
    to one of this relay's destinations (``mine``; None: all); the keys held by other relays
    or waiting for another destination's row, and those just taken, are left out of a
    second, deeper look at the due rows, so that a long run of rows this relay cannot take
    never hides the rest.
    """
    blocked = connection.execute(sql.blocked, params).all()
    parked = [
        {"key": b.message_key, "after": b.id, "until": b.available_at} for b in blocked if not b.due
    ]
    if parked:
        connection.execute(sql.park, parked)
    # By position: PostgreSQL's claim rows are the driver's tuples (:func:`.claim_pg.run_raw`).
    taken_keys = {row[_KEY] for row in taken if row[_KEY] is not None}
    taken_ids = {row[_ID] for row in taken}

    def takeable(b: Any) -> bool:
        return bool(b.free) and (mine is None or b.destination in mine)

    late = [
        _Head(b.id, b.message_key)
        for b in blocked
        if b.due and takeable(b) and b.id not in taken_ids and b.message_key not in taken_keys
    ]
    elsewhere = {b.message_key for b in blocked if b.due and not takeable(b)}
    if not (parked or late or elsewhere):
        return []
    deeper = {
        **params,
        "scan": params["window"] * SECOND_LOOK_SCAN,
        # The whole deeper scan is looked at, not a window of it: keys held elsewhere that
        # the first window did not show could fill a small one again (the claim model
        # found a stall so, with three relays and a window of 6).
        "window": params["window"] * SECOND_LOOK_SCAN,
        "excluded": sorted(taken_keys | elsewhere),
        # What this claim already took is on its way: it neither blocks nor is free.
        "in_flight": [*params["in_flight"], params["owner"]],
        "heads": budget,
    }
    heads = [_Head(r.id, r.message_key) for r in connection.execute(sql.heads, deeper)]
    found = {h.id for h in heads}
    heads += [h for h in late if h.id not in found]
    return _take(connection, sql, deeper, heads[:budget], budget) if heads else []


def _take(
    connection: Connection,
    sql: _Statements,
    params: dict[str, Any],
    heads: list[_Head],
    budget: int,
) -> list[Any]:
    """Lock and lease ``heads`` (those still free), then their followers, up to ``budget``."""
    ids = [h.id for h in heads]
    if sql.take is not None:  # PostgreSQL: lock, followers and lease in one statement
        return run_raw(connection, sql.take, {**params, "ids": ids, "limit": budget})
    if connection.dialect.name != "sqlite":  # SQLite runs one relay and has no row locks
        key_of = {h.id: h.message_key for h in heads}
        locked = connection.execute(sql.lock, {**params, "ids": ids}).scalars()
        heads = [_Head(row_id, key_of[row_id]) for row_id in sorted(locked)]
        if not heads:
            return []
        ids = [h.id for h in heads]
    head_of = {h.message_key: h.id for h in heads if h.message_key is not None}
    room = budget - len(ids)
    if head_of and room > 0:
        ids.extend(_followers(connection, sql, params, head_of, room))
    ids = _within_bytes(connection, sql, ids, params["max_bytes"], params["alone"])
    connection.execute(sql.lease, {**params, "ids": ids})
    return list(connection.execute(sql.read, {"ids": ids}).all())


def _followers(
    connection: Connection,
    sql: _Statements,
    params: dict[str, Any],
    head_of: dict[str, int],
    budget: int,
) -> list[int]:
    """The rows after each head, in id order, while they are due and free."""
    rows = connection.execute(
        sql.followers,
        {
            **params,
            "keys": list(head_of),
            "after": min(head_of.values()),
            "limit": budget + len(head_of),
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


def _within_bytes(
    connection: Connection, sql: _Statements, ids: list[int], limit: int, alone: bool
) -> list[int]:
    """The first of ``ids`` in id order whose payloads add up to at most ``limit`` bytes
    (a first one larger than that alone, when ``alone``), as the PostgreSQL claim cuts."""
    if limit >= NO_BOUND:
        return ids
    kept: list[int] = []
    total = 0
    for row_id, size in connection.execute(sql.sizes, {"ids": ids}).all():
        total += size or 0
        if total > limit and (kept or not alone):
            break
        kept.append(row_id)
    return kept


@contextlib.contextmanager
def autocommit(connection: Connection) -> Iterator[None]:
    """Run single-statement steps without a transaction, then put the connection back."""
    connection.execution_options(isolation_level="AUTOCOMMIT")
    try:
        yield
    except BaseException:
        connection.rollback()  # ends SQLAlchemy's marker (and an invalidated connection's)
        raise
    else:
        connection.commit()  # ends SQLAlchemy's marker; nothing to commit in the database
    finally:
        if not connection.invalidated:
            connection.execution_options(isolation_level=connection.default_isolation_level)


# The statements, built once per dialect --------------------------------------------------


@dataclass(frozen=True)
class _Statements:
    heads: Any
    blocked: Any
    park: Any
    lock: Any
    claim: Any | None
    """PostgreSQL: the whole claim (:mod:`outboxer.store.claim_pg`); None elsewhere."""
    take: Any | None
    """PostgreSQL: lock, followers and lease of the heads ``ids``; None elsewhere."""
    followers: Any
    lease: Any
    read: Any
    sizes: Any
    """MariaDB and SQLite: the payload bytes of the rows ``ids``, in id order."""


@cache
def _statements(name: str, filtered: bool, shared: bool = False) -> _Statements:
    current = now(name)
    due = outbox.c.available_at <= current
    ready = and_(due, free(name))
    if filtered:
        ready = and_(ready, for_destinations(name))

    def by_ids(stmt: Any) -> Any:
        if name == "postgresql":
            return stmt.where(outbox.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
        return stmt.where(outbox.c.id.in_(bindparam("ids", expanding=True)))

    lease = by_ids(update(outbox)).values(
        locked_by=bindparam("owner"), locked_until=later(name, "lease")
    )
    lock = by_ids(select(outbox.c.id)).where(ready).with_for_update(skip_locked=True)
    prefix = (
        select(outbox.c.id, outbox.c.message_key, outbox.c.available_at)
        .where(and_(ready, in_share(name)) if shared else ready)
        .order_by(outbox.c.available_at, outbox.c.id)
        .limit(bindparam("scan", type_=BigInteger()))
        .subquery("s")
    )
    window = (
        select(prefix.c.id, prefix.c.message_key, prefix.c.available_at)
        .where(or_(prefix.c.message_key.is_(None), ~is_in(name, prefix.c.message_key, "excluded")))
        .order_by(prefix.c.available_at, prefix.c.id)
        .limit(bindparam("window", type_=BigInteger()))
        .subquery("w")
    )
    heads = _heads(name, window)
    postgresql = name == "postgresql"
    return _Statements(
        heads=heads,
        blocked=_blocked(name, window),
        park=update(outbox)
        .where(
            outbox.c.message_key == bindparam("key"),
            outbox.c.id > bindparam("after", type_=BigInteger()),
            outbox.c.available_at < bindparam("until", type_=outbox.c.available_at.type),
        )
        .values(available_at=bindparam("until", type_=outbox.c.available_at.type)),
        lock=lock,
        claim=claim_statement(ready, heads) if postgresql else None,
        take=claim_statement(ready, None) if postgresql else None,
        followers=select(outbox.c.id, outbox.c.message_key, ready.label("ready"))
        .where(
            outbox.c.message_key.in_(bindparam("keys", expanding=True)),
            outbox.c.id > bindparam("after", type_=BigInteger()),
        )
        .order_by(outbox.c.id)
        .limit(bindparam("limit", type_=BigInteger())),
        lease=lease,
        read=select(*SENT_COLUMNS).where(outbox.c.id.in_(bindparam("ids", expanding=True))),
        sizes=select(outbox.c.id, func.length(outbox.c.payload))
        .where(outbox.c.id.in_(bindparam("ids", expanding=True)))
        .order_by(outbox.c.id),
    )


def _first_of_key(name: str, key: Any) -> Any:
    """The smallest id of a pending row of ``key`` that holds back later rows.

    ``ORDER BY id LIMIT 1``, so that only the ``(message_key, id)`` index answers it: the
    plan stays good before the table has statistics (a fresh table, a burst), when a
    planner guessing one row per step would otherwise pick nested scans.
    """
    p = outbox.alias("p")
    return (
        select(p.c.id)
        .where(p.c.message_key == key, holds_back(name, p))
        .order_by(p.c.id)
        .limit(1)
        .scalar_subquery()
    )


def _ranked(window: Any) -> Any:
    return select(
        window.c.id,
        window.c.message_key,
        window.c.available_at,
        func.min(window.c.id).over(partition_by=window.c.message_key).label("first_id"),
    ).subquery("r")


def _heads(name: str, window: Any) -> Any:
    """Heads among the first ``window`` due, free rows in due order (a plain read).

    Looking only at a window keeps a claim's cost proportional to the batch, not to the
    backlog (with few keys almost every pending row is a follower). Within the window only
    a key's first row can be its head, and the index is asked about those alone.
    """
    ranked = _ranked(window)
    return (
        select(ranked.c.id, ranked.c.message_key)
        .where(
            or_(
                ranked.c.message_key.is_(None),
                and_(
                    ranked.c.id == ranked.c.first_id,
                    ranked.c.id == _first_of_key(name, ranked.c.message_key),
                ),
            )
        )
        .order_by(ranked.c.available_at, ranked.c.id)
        .limit(bindparam("heads", type_=BigInteger()))
    )


def _blocked(name: str, window: Any) -> Any:
    """For each key of the window whose first row there is not its head: the row that
    holds it back, its destination, whether it is due, and whether it is free."""
    ranked = _ranked(window)
    firsts = (
        select(
            ranked.c.id.label("first"),
            _first_of_key(name, ranked.c.message_key).label("blocker"),
        )
        .where(ranked.c.message_key.is_not(None), ranked.c.id == ranked.c.first_id)
        .subquery("f")
    )
    b = outbox.alias("b")
    current = now(name)
    return (
        select(
            b.c.id,
            b.c.message_key,
            b.c.destination,
            b.c.available_at,
            (b.c.available_at <= current).label("due"),
            free(name, b).label("free"),
        )
        .select_from(firsts.join(b, b.c.id == firsts.c.blocker))
        .where(b.c.id != firsts.c.first)
        .order_by(b.c.available_at, b.c.id)
    )
