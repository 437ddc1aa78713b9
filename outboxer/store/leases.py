"""Leases on outbox rows: who holds a row, and when a row counts as free.

A relay leases the rows of a batch under a *token*, ``<relay id>/<batch number>``. The
relay id is random per relay process (see :mod:`outboxer.store.liveness`). A row is
**free** for a claiming relay when

* nobody leases it, or its lease has expired; or
* the relay holding it is known to be dead (it no longer holds its liveness lock); or
* the claiming relay holds it itself, under a token that is not in flight: a batch that
  left the pipeline abnormally (a failed claim, a failed settle) leaves such leases.

And an earlier pending row of a key **holds back** the later ones unless it is one of the
claiming relay's own rows in flight: those are on the wire ahead of the later rows, in
order (see docs/relay.md, "Ordering").

The statements are built once; what varies per claim travels as parameters
(:func:`scope_params`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, and_, any_, bindparam, case, func, or_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement

from ..tables import outbox
from .clock import now

__all__ = [
    "RELAY_ID_LENGTH",
    "LeaseScope",
    "free",
    "holds_back",
    "in_share",
    "is_in",
    "relay_of",
    "token",
]

RELAY_ID_LENGTH = 16
"""A relay id is 16 hexadecimal characters; a token is the id, a slash and a number."""


def token(relay_id: str, batch: int) -> str:
    """The lease token of batch number ``batch`` of relay ``relay_id``."""
    return f"{relay_id}/{batch}"


def relay_of(lease_token: str) -> str:
    """The relay id a lease token belongs to."""
    return lease_token[:RELAY_ID_LENGTH]


@dataclass(frozen=True)
class LeaseScope:
    """What a claim needs to know about the relay that claims."""

    relay: str
    """The claiming relay's id."""
    in_flight: Sequence[str] = ()
    """Tokens of the claiming relay's batches on the wire."""
    dead: Sequence[str] = ()
    """Ids of relays known to be dead: their leases are free."""
    destinations: Sequence[str] | None = None
    """Only rows for these destinations (None: all)."""
    share: tuple[int, int] | None = None
    """(rank, count): prefer the keys whose hash modulo ``count`` is ``rank`` (None: all)."""

    def params(self) -> dict[str, Any]:
        return {
            "relay": self.relay,
            "in_flight": list(self.in_flight),
            "dead": list(self.dead),
            "destinations": list(self.destinations or ()),
            "share_rank": self.share[0] if self.share else 0,
            "share_count": self.share[1] if self.share else 1,
        }


def is_in(dialect: str, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """``column`` is one of the list parameter ``name`` (one statement for any length)."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(String)))
    return column.in_(bindparam(name, expanding=True))


def _lease_relay(table: Any) -> ColumnElement[str]:
    return func.substr(table.c.locked_by, 1, RELAY_ID_LENGTH)


def free(dialect: str, table: Any = outbox) -> ColumnElement[bool]:
    """The row's lease, if any, does not keep the claiming relay from taking it."""
    return or_(
        table.c.locked_by.is_(None),
        table.c.locked_until < now(dialect),
        is_in(dialect, _lease_relay(table), "dead"),
        and_(
            _lease_relay(table) == bindparam("relay"),
            ~is_in(dialect, table.c.locked_by, "in_flight"),
        ),
    )


def holds_back(dialect: str, table: Any) -> ColumnElement[bool]:
    """A pending row of ``table`` (an alias of the outbox) holds back later rows of its key:
    every pending row does, except the claiming relay's own rows in flight."""
    return or_(table.c.locked_by.is_(None), ~is_in(dialect, table.c.locked_by, "in_flight"))


def in_share(dialect: str, table: Any = outbox) -> ColumnElement[bool]:
    """The row belongs to the claiming relay's share: its key's hash (a keyless row: its id)
    modulo ``share_count`` is ``share_rank``. Every relay computes the same hash in the
    database, so the shares of live relays that agree on their count do not overlap."""
    count = bindparam("share_count", type_=Integer())
    rank = bindparam("share_rank", type_=Integer())
    if dialect == "postgresql":
        hashed: Any = func.hashtext(table.c.message_key).op("&")(0x7FFFFFFF)
    else:
        hashed = func.crc32(table.c.message_key)
    return case(
        (table.c.message_key.is_(None), table.c.id % count == rank), else_=hashed % count == rank
    )


def for_destinations(dialect: str, table: Any = outbox) -> ColumnElement[bool]:
    """The row goes to one of the claim's destinations."""
    return is_in(dialect, table.c.destination, "destinations")
