"""PostgreSQL: a claim's lock, followers and lease in one statement.

The steps are those of :mod:`outboxer.store.claims` (lock the heads that are still free with
``FOR UPDATE SKIP LOCKED``; for their keys, the following rows in id order for as long as
they are due and free; lease everything), written as common table expressions of one
``UPDATE ... RETURNING``: one round trip instead of four, and the rule "a key's run stops
before its first row that must wait" is a running ``bool_and`` instead of a loop over the
candidate rows in Python.

* ``locked``: the heads (given as ids, or found by the heads query itself), still due and
  free, locked so that two relays never take the same one;
* ``candidates``: the rows of those heads' keys from the smallest head on, in id order, as
  many as the batch has room for plus one per key (the bound of the step-by-step claim);
* ``followers``: of these, each key's rows after its head (rows before it are this relay's
  own rows on the wire, skipped) for as long as every row after the head is due and free,
  the first of them in id order up to the batch's room;
* ``taken``, ``sized``: heads and followers in id order, as far as their payloads add up
  to ``max_bytes`` (a first row larger than that alone, when ``alone``);
* the ``UPDATE`` leases them and returns what a claim reads.

Everything is one statement: its reads share one snapshot and its locks are taken before
the lease is written, so nothing between the steps can change what they saw (the
step-by-step claim commits after each step; the argument of docs/relay.md that no other
relay can take a follower holds for both).
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    and_,
    any_,
    bindparam,
    func,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.elements import ColumnElement

from ..tables import outbox
from .clock import later
from .compiled import Compiled
from .relay import SENT_COLUMNS

__all__ = ["claim_statement", "run_raw"]

_compiled: dict[tuple[Any, type[Dialect], str], Compiled] = {}
_lock = threading.Lock()


def run_raw(connection: Connection, statement: Any, params: dict[str, Any]) -> list[Any]:
    """Run a claim statement compiled once per driver, its rows as psycopg made them
    (tuples: read them by position).

    The rows skip SQLAlchemy's result processing (psycopg already gives UUIDs, bytes and
    aware datetimes, in the session's time zone: :func:`~.relay.claimed_from_row` puts them
    in UTC); other drivers get the statement as it is.
    """
    dialect = connection.dialect
    if dialect.driver != "psycopg":
        return list(connection.execute(statement, params))
    key = (statement, type(dialect), dialect.paramstyle)
    compiled = _compiled.get(key)
    if compiled is None:
        with _lock:
            compiled = _compiled.setdefault(key, Compiled.of(statement, dialect))
    result = connection.exec_driver_sql(compiled.sql, compiled.parameters(params))
    # psycopg's own tuples, without a SQLAlchemy Row around each (a fifth of a claim's
    # client time for 1,000 rows); read them by position (SENT_COLUMNS' order).
    try:
        return list(result.cursor.fetchall())
    finally:
        result.close()


def claim_statement(ready: ColumnElement[bool], heads: Any | None) -> Any:
    """Lock, follow and lease in one statement, up to the parameter ``limit`` rows and
    ``max_bytes`` bytes of payload (but one row larger than that if ``alone``).

    ``heads``: the heads query (a SELECT of ``id``, ``message_key``), run inside the
    statement; None: the heads are the parameter ``ids``.
    """
    if heads is None:
        wanted: ColumnElement[bool] = outbox.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger)))
    else:
        found = heads.cte("heads")
        wanted = outbox.c.id.in_(select(found.c.id))
    size = func.octet_length(outbox.c.payload).label("size")  # without reading TOASTed data
    locked = (
        select(outbox.c.id, outbox.c.message_key, size)
        .where(wanted, ready)
        .with_for_update(skip_locked=True)
        .cte("locked")
    )
    limit = bindparam("limit", type_=BigInteger())
    keyless = select(func.count()).select_from(locked).where(locked.c.message_key.is_(None))
    # The IN tests stay hashed lookups (a join would be planned as nested loops, the CTE
    # being estimated at one row): IS TRUE keeps the planner from turning them into joins.
    candidates = (
        select(
            outbox.c.id,
            outbox.c.message_key,
            size,
            ready.label("ready"),
            outbox.c.id.in_(select(locked.c.id)).label("head"),
        )
        .where(
            outbox.c.message_key.in_(select(locked.c.message_key)).is_(true()),
            outbox.c.id
            >= select(func.min(locked.c.id))
            .where(locked.c.message_key.is_not(None))
            .scalar_subquery(),
        )
        .order_by(outbox.c.id)
        .limit(limit - keyless.scalar_subquery() + 1)
        .cte("candidates")
        .prefix_with("MATERIALIZED")
    )
    # Per key in id order: ``reached``, at or after the key's head; ``free_run``, every row
    # after the head up to this one is due and free.
    marked = select(
        candidates,
        func.bool_or(candidates.c.head)
        .over(partition_by=candidates.c.message_key, order_by=candidates.c.id)
        .label("reached"),
    ).subquery("marked")
    runs = select(
        marked.c.id,
        marked.c.size,
        marked.c.head,
        marked.c.reached,
        func.bool_and(or_(marked.c.ready, ~marked.c.reached, marked.c.head))
        .over(partition_by=marked.c.message_key, order_by=marked.c.id)
        .label("free_run"),
    ).cte("runs")
    room = func.greatest(limit - select(func.count()).select_from(locked).scalar_subquery(), 0)
    followers = (
        select(runs.c.id, runs.c.size)
        .where(runs.c.reached, ~runs.c.head, runs.c.free_run)
        .order_by(runs.c.id)
        .limit(room)
    )
    taken = union_all(
        select(locked.c.id, locked.c.size), followers.subquery("f").select()
    ).subquery("taken")
    # The bytes bound: the taken rows in id order while their payloads add up to at most
    # ``max_bytes``, the first one in any case if ``alone``. A prefix in id order of heads and their
    # runs is a prefix of every key's run: the rows left stay behind the ones taken.
    sized = select(
        taken.c.id,
        taken.c.size,
        func.sum(taken.c.size).over(order_by=taken.c.id).label("upto"),
    ).subquery("sized")
    max_bytes = bindparam("max_bytes", type_=BigInteger())
    first = and_(sized.c.upto == sized.c.size, bindparam("alone", type_=Boolean()))
    kept = select(sized.c.id).where(or_(sized.c.upto <= max_bytes, first))
    return (
        update(outbox)
        .where(outbox.c.id.in_(kept))
        .values(locked_by=bindparam("owner"), locked_until=later("postgresql", "lease"))
        .returning(*SENT_COLUMNS)
    )
