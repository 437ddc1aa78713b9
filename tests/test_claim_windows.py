"""The second look of a claim reaches past every key held by another relay.

Found by the claim model's long profile (``make chaos``, 2026-11-29): with three relays
and a window of 6, the first window held only rows of key ``a`` (held back by a lease of a
live relay), the second look left ``a`` out but looked at a window of 6 again, which the
rows of ``c`` (held by another relay) filled; key ``b``'s head was never seen and the
claim took nothing. The second look now reads its whole deeper scan.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

import outboxer
from outboxer.store import claims
from outboxer.store.leases import LeaseScope

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)

A, C, ME = "000000000000000a", "000000000000001a", "000000000000002a"


def test_keys_held_by_other_relays_beyond_the_first_window_do_not_hide_a_free_head(
    engine: Engine,
) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    rows: list[dict[str, object]] = []

    def add(key: str | None, count: int, lock: str | None = None) -> None:
        for _ in range(count):
            rows.append(
                {
                    "message_id": uuid.uuid4(),
                    "message_type": "test.model",
                    "destination": "orders",
                    "message_key": key,
                    "payload": b"{}",
                    "headers": "{}",
                    "content_type": "application/json",
                    "handler_attempt": 1,
                    "attempts": 0,
                    "occurred_at": past,
                    "available_at": past,
                    "locked_by": lock,
                    "locked_until": past + timedelta(hours=1) if lock else None,
                }
            )

    add("a", 3, f"{A}/1")  # key a: its first rows leased by a live relay
    add("c", 3, f"{C}/7")  # key c: the same, by another
    add("a", 17)  # the first window (6 rows) holds only a's followers
    add("c", 7)  # the second look's first 6 rows would be c's followers
    add("b", 4)  # b's head is free and due
    with engine.begin() as conn:
        conn.execute(insert(outboxer.outbox), rows)
    scope = LeaseScope(relay=ME, in_flight=[], dead=[], share=None)
    with engine.connect() as conn:
        got = claims.claim_batch(
            conn, owner=f"{ME}/1", scope=scope, limit=1000, lease_seconds=60, window=6
        )
    assert [c.envelope.key for c in got] == ["b"] * 4
