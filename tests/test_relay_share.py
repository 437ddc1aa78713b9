"""Relays share the keys: each claims first among the keys of its own share, so that a key
does not stay with the relay that first took it (issue 12, item 4)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.relay.liveness import Liveness
from outboxer.store import claims
from outboxer.store.leases import LeaseScope, token

SessionFactory = sessionmaker[outboxer.OutboxSession]

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)


def _publish(Session: SessionFactory, keys: list[str], per_key: int = 3) -> None:
    with Session.begin() as session:
        for n in range(per_key):
            for key in keys:
                session.publish({"n": n}, type="share.t", destination="share", key=key)


def _claim(engine: Engine, relay: str, share: tuple[int, int] | None) -> set[str | None]:
    scope = LeaseScope(relay=relay, share=share)
    with engine.connect() as conn:
        rows = claims.claim_batch(
            conn, owner=token(relay, 1), scope=scope, limit=1000, lease_seconds=60
        )
    return {row.envelope.key for row in rows}


def test_two_relays_claim_disjoint_shares_of_the_keys(
    engine: Engine, Session: SessionFactory
) -> None:
    keys = [f"key-{n}" for n in range(40)]
    _publish(Session, keys)
    first = _claim(engine, "a" * 16, (0, 2))
    second = _claim(engine, "b" * 16, (1, 2))
    # Without shares the first relay would take every key and the second none.
    assert first and second
    assert not first & second
    assert first | second == set(keys)


def test_a_relay_whose_share_is_empty_claims_from_the_others(
    engine: Engine, Session: SessionFactory
) -> None:
    _publish(Session, [f"key-{n}" for n in range(40)])
    mine = _claim(engine, "a" * 16, (0, 2))
    # Relay a leased all of share 0: a relay that also counts itself rank 0 finds nothing
    # it can take there, and claims from the other share instead of idling.
    theirs = _claim(engine, "c" * 16, (0, 2))
    assert theirs and not theirs & mine


def test_live_relays_know_their_rank_and_count(engine: Engine) -> None:
    outboxer.create_all(engine)
    one, two = Liveness(engine, "one", 60.0), Liveness(engine, "two", 60.0)
    try:
        one.check()
        two.check()
        one.check()
        assert one.share is not None and two.share is not None
        assert {one.share, two.share} == {(0, 2), (1, 2)}
        two.stop()
        one.check()
        assert one.share is None
    finally:
        one.stop()
        two.stop()
