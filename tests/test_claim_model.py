"""A hypothesis state machine of claiming, against a model, on real PostgreSQL and MariaDB.

Several relays claim, send, fail, crash and lose claims half-way (one with a claim queued
behind it, which the relay hands back) over random keyed and keyless rows with delays and
backoffs, through the store's claim and settle SQL; a settle of a batch with no keyed row
to send again may run before a claim queued ahead of it, as on the relay's database
thread (with any settle allowed to, the model finds a key sent out of order). A relay
here behaves as :class:`outboxer.Relay` does with a synchronous transport: it sends its
oldest claimed batch when it lands it, holds back a key inside a batch once a message of
the key failed, and drops the held keys' rows from the batches it claimed before.

After every step the model checks:

* **first sends stay in order**: when a row is sent for the first time, every earlier
  row of its key was sent before (or dead-lettered);
* **no key is split**: the rows of a key in flight belong to one relay;
* **progress**: a relay with nothing in flight that claims gets rows whenever some key's
  earliest pending row (or any keyless row) is due and free for it.

Two of the three relays claim as relays that share the keys (each looks in its own share
first); the third claims among all keys, as a relay does that counts the relays otherwise.

The example budget is small in ``make test``; ``HYPOTHESIS_PROFILE=chaos`` (``make chaos`` runs
the tests marked ``long_profile`` so) runs many more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

import outboxer
from outboxer import store
from outboxer.message import Envelope
from outboxer.store import claims, settle
from outboxer.store.claims import SECOND_LOOK_SCAN
from outboxer.store.clock import db_now_plus
from outboxer.store.leases import LeaseScope, token
from outboxer.store.relay import Claimed, DeadLetterRow, RetryRow

from .conftest import clean

KEYS = ["a", "b", "c", None]
LATER = 600.0  # a delay or backoff: not due until time moves past it
LEASE = 3600.0  # leases never expire by themselves here
SIZES = [2, 400, 1000]  # payload bytes
MAX_BYTES = [None, 500, 1500]  # a claim's bytes: a row of 1000 goes alone past 500
WINDOW = 6  # a small window: blocked rows can fill it, as thousands do in production

PROFILE = "chaos" if os.environ.get("HYPOTHESIS_PROFILE") == "chaos" else "ci"
BUDGET = {"ci": (15, 25), "chaos": (200, 50)}[PROFILE]


@dataclass
class Row:
    id: int
    key: str | None
    sent: bool = False
    dead: bool = False

    @property
    def pending(self) -> bool:
        return not (self.sent or self.dead)


@dataclass
class Relay:
    relay_id: str
    batches: list[tuple[str, list[Claimed], int]] = field(default_factory=list)
    """Claimed, not yet landed: (token, rows, the claim's place in this relay's task order)."""
    tasks: int = 0
    holds: list[tuple[set[str], int]] = field(default_factory=list)
    """Keys held back from batches claimed before task number ``int``."""
    numbers: int = 0

    def next_token(self) -> str:
        self.numbers += 1
        return token(self.relay_id, self.numbers)


class ClaimModel(RuleBasedStateMachine):
    engine: Engine

    @initialize()
    def start(self) -> None:
        clean(self.engine)
        self.rows: dict[int, Row] = {}
        self.relays = [Relay(f"{n:015x}a") for n in range(3)]
        self.dead: list[str] = []
        self.generation = 3

    # Producers -----------------------------------------------------------------------

    @rule(
        key=st.sampled_from(KEYS),
        count=st.integers(1, 4),
        delayed=st.booleans(),
        size=st.sampled_from(SIZES),
    )
    def publish(self, key: str | None, count: int, delayed: bool, size: int = 2) -> None:
        with self.engine.begin() as conn:
            for _ in range(count):
                store.insert_messages(
                    conn,
                    [
                        store.NewMessage(
                            _envelope(key, size), LATER if delayed and count == 1 else 0
                        )
                    ],
                )
        with self.engine.connect() as conn:
            ids = conn.execute(
                select(outboxer.outbox.c.id).order_by(outboxer.outbox.c.id.desc()).limit(count)
            ).scalars()
            for row_id in ids:
                self.rows.setdefault(row_id, Row(row_id, key))

    @rule()
    def time_passes(self) -> None:
        """Every delay and backoff so far runs out (parked rows with their blockers)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(outboxer.outbox)
                .where(outboxer.outbox.c.available_at > db_now_plus(conn.dialect, 0))
                .values(available_at=db_now_plus(conn.dialect, -1))
            )

    # Relays ------------------------------------------------------------------------------

    @rule(r=st.integers(0, 2), limit=st.integers(1, 6), max_bytes=st.sampled_from(MAX_BYTES))
    def claim(self, r: int, limit: int, max_bytes: int | None = None) -> None:
        relay = self.relays[r]
        owner = relay.next_token()
        got = self._claim(relay, owner, limit, max_bytes=max_bytes)
        if max_bytes is not None and len(got) > 1:
            assert sum(len(row.envelope.payload) for row in got) <= max_bytes
        relay.tasks += 1
        if got:
            relay.batches.append((owner, got, relay.tasks))

    @rule(r=st.integers(0, 2), limit=st.integers(1, 6))
    def claim_lost_half_way(self, r: int, limit: int) -> None:
        """A claim whose result never reaches the relay (a database blip): its leases stay."""
        relay = self.relays[r]
        self._claim(relay, relay.next_token(), limit)
        relay.tasks += 1

    @rule(
        r=st.integers(0, 2),
        limit=st.integers(1, 6),
        key=st.sampled_from(KEYS),
        committed=st.integers(0, 3),
    )
    def claim_lost_with_a_claim_queued_behind(
        self, r: int, limit: int, key: str | None, committed: int
    ) -> None:
        """A claim whose result never reaches the relay, while the next claim was already
        queued behind it (Relay: claims queued ahead while they come back full), and
        ``committed`` more rows of one of its keys (or ``key``) committed between the two.
        The queued claim
        counted the lost one's rows as on the wire; the relay hands it back unsent."""
        relay = self.relays[r]
        lost = relay.next_token()
        taken = [c.envelope.key for c in self._claim(relay, lost, limit) if c.envelope.key]
        relay.tasks += 1
        if committed:  # the worst case: more rows of a key the lost claim took
            self.publish(taken[-1] if taken else key, committed, delayed=False)
        queued = relay.next_token()
        got = self._claim(relay, queued, 6, ahead=[lost])
        relay.tasks += 1
        self.handed_back = [c.id for c in got]
        if got:
            with self.engine.connect() as conn:
                settle.release(conn, owner=queued, ids=self.handed_back)

    @precondition(lambda self: any(r.batches for r in self.relays))
    @rule(
        r=st.integers(0, 2),
        outcomes=st.lists(
            st.sampled_from(["sent", "sent", "retry", "release", "dead"]), max_size=6
        ),
        settle_fails=st.booleans(),
    )
    def land(self, r: int, outcomes: list[str], settle_fails: bool) -> None:
        relay = self.relays[r]
        if not relay.batches:
            return
        owner, rows, claim_task = relay.batches.pop(0)
        relay.holds = [(k, t) for k, t in relay.holds if t > claim_task]
        held_keys = set().union(*(k for k, _ in relay.holds)) if relay.holds else set()
        sent, retry, dead, release = [], [], [], []
        failed: set[str] = set()
        for i, row in enumerate(rows):
            key = row.envelope.key
            outcome = outcomes[i] if i < len(outcomes) else "sent"
            if key is not None and (key in failed or key in held_keys):
                release.append(row.id)  # held back: never on the wire
                continue
            if outcome == "sent":
                self._sent(row.id)
                sent.append(row.id)
                continue
            if outcome == "dead":
                self.rows[row.id].dead = True
                dead.append(DeadLetterRow(row, "rejected", "no", 1))
                continue
            if key is not None:
                failed.add(key)
            (
                retry.append(RetryRow(row.id, LATER, "e"))
                if outcome == "retry"
                else release.append(row.id)
            )
        relay.tasks += 1
        relay.holds.append((failed, relay.tasks))
        if not settle_fails:  # else the rows stay leased under a token no longer in flight
            with self.engine.connect() as conn:
                settle.settle(
                    conn, owner=owner, sent=sent, retry=retry, dead=dead, release_ids=release
                )
        # The batches claimed before this outcome was written drop the held keys' rows
        # before they are sent (Relay: the pipeline's holds), and hand them back.
        for n, (other, taken, task) in enumerate(relay.batches):
            held = [c for c in taken if c.envelope.key in failed]
            if held:
                relay.batches[n] = (other, [c for c in taken if c not in held], task)
                with self.engine.connect() as conn:
                    settle.release(conn, owner=other, ids=[c.id for c in held])
        relay.batches = [b for b in relay.batches if b[1]]

    @precondition(lambda self: any(r.batches for r in self.relays))
    @rule(
        r=st.integers(0, 2),
        limit=st.integers(1, 6),
        outcomes=st.lists(
            st.sampled_from(["sent", "sent", "retry", "release", "dead"]), max_size=6
        ),
        settle_fails=st.booleans(),
    )
    def settle_overtakes_a_queued_claim(
        self, r: int, limit: int, outcomes: list[str], settle_fails: bool
    ) -> None:
        """A claim queued while the oldest batch was on the wire, and that batch's settle
        running before it (Relay: the settle of a batch with no keyed row to send again is
        urgent on the database thread). The claim counts the settled batch as on the wire
        and comes before the settle in the relay's task order."""
        relay = self.relays[r]
        if not relay.batches:
            return
        _, rows, claim_task = relay.batches[0]
        holds = [k for k, t in relay.holds if t > claim_task]
        held = set().union(*holds) if holds else set()
        if any(c.envelope.key in held for c in rows):
            return  # handed back before it was sent (a task of its own, not urgent)
        whole = [  # keyed rows to send again would make the settle wait its turn
            "sent" if row.envelope.key is not None and outcome in ("retry", "release") else outcome
            for row, outcome in zip(rows, outcomes, strict=False)
        ]
        on_wire = [t for t, _, _ in relay.batches]
        relay.tasks += 1
        queued, queued_task = relay.next_token(), relay.tasks
        self.land(r, whole, settle_fails=settle_fails)
        got = self._claim(relay, queued, limit, ahead=on_wire)
        if got:
            relay.batches.append((queued, got, queued_task))

    @rule(r=st.integers(0, 2))
    def crash(self, r: int) -> None:
        """The relay dies (its lock goes with it): its rows are free for the others at once.
        It comes back under a new id."""
        relay = self.relays[r]
        self.dead.append(relay.relay_id)
        self.generation += 1
        self.relays[r] = Relay(f"{self.generation:015x}a")

    # Invariants ----------------------------------------------------------------------------

    @invariant()
    def no_key_is_split(self) -> None:
        if not hasattr(self, "relays"):
            return
        owners: dict[str, int] = {}
        for n, relay in enumerate(self.relays):
            for _, rows, _ in relay.batches:
                for row in rows:
                    key = row.envelope.key
                    # A row whose outcome is known (sent, or given up) and claimed again
                    # is a duplicate, which may go anywhere: a relay whose settle failed
                    # keeps its lease and claims the row again, and a claim handed back
                    # frees it for every relay. The order of first deliveries is _sent's.
                    if key is not None and self.rows[row.id].pending:
                        assert owners.setdefault(key, n) == n, f"key {key} split between relays"

    @invariant()
    def progress(self) -> None:
        if not hasattr(self, "relays"):
            return
        idle = [relay for relay in self.relays if not relay.batches]
        if not idle or not self._claimable_exists(idle[0]):
            return
        relay = idle[0]
        owner = relay.next_token()
        got = self._claim(relay, owner, 1000)
        relay.tasks += 1
        assert got, "a due, free head exists but the claim took nothing"
        relay.batches.append((owner, got, relay.tasks))

    # Helpers --------------------------------------------------------------------------------

    def _claim(
        self,
        relay: Relay,
        owner: str,
        limit: int,
        ahead: tuple[str, ...] | list[str] = (),
        max_bytes: int | None = None,
    ) -> list[Claimed]:
        # Relays 0 and 1 share the keys between two; relay 2 does not know of sharing (as
        # while relays start and stop, when they disagree on how many run).
        index = self.relays.index(relay)
        scope = LeaseScope(
            relay=relay.relay_id,
            in_flight=[*(t for t, _, _ in relay.batches), *ahead],
            dead=self.dead,
            share=(index, 2) if index < 2 else None,
        )
        with self.engine.connect() as conn:
            return claims.claim_batch(
                conn,
                owner=owner,
                scope=scope,
                limit=limit,
                lease_seconds=LEASE,
                window=WINDOW,
                max_bytes=max_bytes,
            )

    def _sent(self, row_id: int) -> None:
        row = self.rows[row_id]
        if not row.sent:
            for other in self.rows.values():
                if other.key is not None and other.key == row.key and other.id < row.id:
                    assert not other.pending, (
                        f"row {row_id} of key {row.key} sent before row {other.id}"
                    )
            row.sent = True

    def _claimable_exists(self, relay: Relay) -> bool:
        """Among the due rows free for ``relay`` (nothing in flight), as deep as a claim's
        second look reaches, some key's earliest pending row or a keyless row (the
        database's view of due and leased)."""
        others = {r.relay_id for r in self.relays} - {relay.relay_id}
        outbox = outboxer.outbox
        with self.engine.connect() as conn:
            now = conn.execute(select(db_now_plus(conn.dialect, 0))).scalar_one()
            rows = conn.execute(
                select(
                    outbox.c.id, outbox.c.message_key, outbox.c.available_at, outbox.c.locked_by
                ).order_by(outbox.c.id)
            ).all()
        earliest: dict[str, int] = {}
        for row in rows:
            if row.message_key is not None:
                earliest.setdefault(row.message_key, row.id)
        due_free = sorted(
            (row.available_at, row.id, row.message_key)
            for row in rows
            if row.available_at <= now
            and (row.locked_by is None or row.locked_by[:16] not in others)
        )[: WINDOW * SECOND_LOOK_SCAN]
        return any(key is None or earliest[key] == row_id for _, row_id, key in due_free)


def _envelope(key: str | None, size: int = 2) -> Envelope:
    import uuid
    from datetime import datetime, timezone

    return Envelope(
        message_id=uuid.uuid4(),
        type="test.model",
        destination="orders",
        payload=b'"' + b"x" * (size - 2) + b'"',
        occurred_at=datetime.now(timezone.utc) - timedelta(seconds=1),
        key=key,
    )


@pytest.mark.long_profile
@pytest.mark.timeout(3600 if PROFILE == "chaos" else 300)
@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_claims_keep_key_order_never_split_a_key_and_always_progress(engine: Engine) -> None:
    examples, steps = BUDGET
    ClaimModel.engine = engine
    run_state_machine_as_test(
        ClaimModel,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_a_claim_queued_behind_a_lost_claim_reaches_past_it_and_is_handed_back(
    engine: Engine,
) -> None:
    """The rule ``claim_lost_with_a_claim_queued_behind`` step by step (the random runs
    rarely reach it: the progress check claims whatever is free). The queued claim takes
    the rows after the lost claim's, so sending it would put them first; handed back, every
    row goes in order."""
    ClaimModel.engine = engine
    model = ClaimModel()
    model.start()
    model.publish("a", 3, delayed=False)
    first = min(model.rows)
    model.claim_lost_with_a_claim_queued_behind(r=0, limit=1, key="a", committed=2)
    assert model.handed_back == [first + n for n in range(1, 5)]
    model.claim(r=0, limit=6)  # the lost claim's row is free for its own relay again
    model.land(r=0, outcomes=[], settle_fails=False)  # the model checks the order
    assert all(row.sent for row in model.rows.values())
