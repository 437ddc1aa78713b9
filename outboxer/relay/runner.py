"""One ``Relay.run()``: the loop that claims, sends, lands and settles batches.

The loop keeps a database thread busy claiming the next batch and settling the last one
while the broker works, and lands a batch whose results are in before the next one goes
out (:mod:`outboxer.relay.pipeline` states the ordering rule this serves). It checks the
relay's liveness every second, waits out database outages and broker outages (the circuit
breaker), and on stop lands and settles what is on the wire. The database tasks it
submits (claim, settle, hand back, renew) are :mod:`outboxer.relay.tasks`.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from .. import heartbeat, instrumentation
from ..diagnosis import diagnose
from ..errors import TablesMissing
from ..redaction import one_line
from ..store import relay as relay_store
from ..store.leases import token
from ..waiter import Waiter
from . import idle
from .database import STOP_GRACE, Abandoned, DatabaseThread, Outage, count
from .decide import Decisions, decide
from .pipeline import Batch, Pipeline
from .reports import BatchReport, RelayStats
from .tasks import Tasks

if TYPE_CHECKING:
    from .relay import Relay

__all__ = ["LIVENESS_INTERVAL", "PIPELINE_DEPTH", "Run"]

log = logging.getLogger("outboxer.relay")

T = TypeVar("T")

LIVENESS_INTERVAL = 1.0
"""How often a relay checks its own lock and looks for dead relays."""

PIPELINE_DEPTH = 4
"""Batches on the wire at most (while the broker answers): the broker persists and
confirms one while the next ones are published, and the database thread claims ahead."""

CLAIMS_AHEAD = 2
"""Claims queued on the database thread ahead of the loop while claims come back full (a
backlog): the database thread claims while the loop waits for confirms, instead of only
once the loop has taken the last claim. One otherwise, so that a claim is never older than
the loop's last look."""


class Run:
    """One ``Relay.run()``: the database thread, the pipeline, and the batches between."""

    def __init__(self, relay: Relay, once: bool, waiter: Waiter | None) -> None:
        self.relay = relay
        self.once = once
        self.waiter = waiter
        self.db = DatabaseThread()
        self.liveness = relay.liveness
        """This run's liveness (an abandoned run's stays with its database thread)."""
        self.tasks = Tasks(relay, self.liveness, self.db)
        self.pipeline = Pipeline(relay.transport, relay._stop, self._waiting)
        self.prefetch: deque[tuple[str, Future[Batch]]] = deque()
        """Claims submitted and not yet taken by the loop, oldest first, with their tokens."""
        self.backlog = False
        """The last claim came back full."""
        self.settling: deque[Future[BatchReport]] = deque()
        self.totals = RelayStats()
        self.outage = Outage(relay._rand)
        self.next_check = float("-inf")
        self.next_renewal = float("-inf")
        self.batches = 0

    def loop(self) -> RelayStats:
        relay = self.relay
        try:
            self._start()
            while not relay._stop.is_set():
                heartbeat.beat(f"relay {relay.name}")  # liveness (--health-port)
                self._collect(block=False)
                self._check_liveness()
                pause = relay.breaker.remaining(relay._clock())
                if pause > 0:
                    self._drain()
                    if self.once:
                        break
                    self._wait(pause)
                    continue
                batch = self._next_batch()
                if batch is None:
                    continue
                while self.pipeline.oldest_done():
                    self._land()  # results already in: their holds apply to this batch
                claimed_none = not batch.rows
                batch = self._hold_back(batch)
                if not batch.rows:
                    if len(self.pipeline):
                        self._land()
                        continue
                    if self.prefetch:  # a later claim is already on its way
                        continue
                    self._collect(block=True)
                    if self.once:
                        break
                    self._idle(batch.claim_started if claimed_none else None)
                    continue
                if not relay.breaker.is_open:  # while probing a broker, one batch at a time
                    # The next claims run while this batch is encoded and put on the wire
                    # (they count it as on the wire: nothing can come between them).
                    while len(self.prefetch) < (CLAIMS_AHEAD if self.backlog else 1):
                        self._prefetch(ahead=batch)
                self.pipeline.send(batch)
                while len(self.pipeline) >= (1 if relay.breaker.is_open else PIPELINE_DEPTH):
                    self._land()
        except Abandoned:
            pass  # the database did not answer a stopping relay: _shut_down says so
        finally:
            self._shut_down()
        return self.totals

    # Steps -----------------------------------------------------------------------------

    def _start(self) -> None:
        """Check the tables, register, take the liveness lock, learn who is dead."""
        while not self.relay._stop.is_set():
            try:
                self._result(self.db.submit(lambda _seq: self.liveness.check()))
            except Exception as exc:
                self._database_trouble(exc)
                continue
            self.outage.recovered()
            self.next_check = self.relay._clock() + LIVENESS_INTERVAL
            return

    def _check_liveness(self) -> None:
        now = self.relay._clock()
        if now >= self.next_check:
            self.next_check = now + LIVENESS_INTERVAL
            self.db.submit(self.tasks.check_liveness)

    def _waiting(self, seconds: float) -> None:
        """While the loop waits for the broker (a resource alarm may hold the confirms for
        hours): stay live, and keep the leases of the batches on the wire and of the claims
        queued behind them, every third of a lease, so that no other relay takes their rows
        and sends them again."""
        heartbeat.beat(f"relay {self.relay.name}")
        self._check_liveness()
        now = self.relay._clock()
        if seconds >= self.relay.lease / 3 and now >= self.next_renewal:
            self.next_renewal = now + self.relay.lease / 3
            owners = self.pipeline.tokens() + [queued for queued, _ in self.prefetch]
            self.db.submit(partial(self.tasks.renew, owners))

    def _prefetch(self, ahead: Batch | None = None) -> None:
        """Queue the next claim on the database thread, behind the batches on the wire,
        ``ahead`` (the batch about to join them) and the claims already queued: their rows
        go on the wire before this claim's, so they do not hold back its keys.

        Whatever drops rows from a batch that a later claim counted on (a hold, a failed
        claim, a broker outage) keeps the order: a hold reaches every batch claimed before
        the held rows' outcome was written (:class:`~.pipeline.Pipeline`), and a failed
        claim or an outage discards every claim queued behind it (:meth:`_discard_prefetch`).
        """
        self.batches += 1
        owner = token(self.liveness.relay_id, self.batches)
        tokens = self.pipeline.tokens()
        if ahead is not None:
            tokens.append(ahead.token)
        tokens += [queued for queued, _ in self.prefetch]
        self.prefetch.append((owner, self.db.submit(partial(self.tasks.claim, owner, tokens))))

    def _next_batch(self) -> Batch | None:
        if not self.prefetch:
            self._prefetch()
        _, pending = self.prefetch.popleft()
        try:
            batch = self._result(pending)
        except Exception as exc:
            self._discard_prefetch()  # queued behind the failed claim, counting on its rows
            self._database_trouble(exc)
            return None
        self.outage.recovered()
        self.backlog = len(batch.rows) >= self.relay.batch_size or (
            sum(len(row.envelope.payload) for row in batch.rows) > self.relay.batch_bytes // 2
        )
        return batch

    def _hold_back(self, batch: Batch) -> Batch:
        held = self.pipeline.held_rows(batch)
        if not held:
            return batch
        self.db.submit(partial(self.tasks.release, batch.token, held))
        ids = set(held)
        return replace(batch, rows=[row for row in batch.rows if row.id not in ids])

    def _land(self) -> None:
        """Take the oldest batch off the wire, decide, and settle it (database thread)."""
        relay = self.relay
        landed = self.pipeline.land()
        decisions = decide(landed.batch.rows, landed.results, relay.policy, relay._rand)
        report = BatchReport(
            claimed=len(landed.batch.rows),
            sent=len(decisions.sent),
            retried=len(decisions.retry),
            dead_lettered=len(decisions.dead),
            released=len(decisions.release),
            unavailable=decisions.unavailable is not None,
            claim_seconds=landed.batch.claim_seconds,
            send_seconds=landed.send_seconds,
        )
        self._breaker(decisions)
        decisions.dead = [_with_dead_letter_span(d) for d in decisions.dead]
        # A batch with no keyed row to send again is settled before the claims queued
        # ahead (the duplicate window after a crash): its settle frees no row of a key, so
        # no claim takes anything new. A settle that frees rows of a key keeps its place: a
        # claim queued before it counts the batch as on the wire and could take a freed
        # row, then be held back, while a claim queued behind it, counting its rows as on
        # the wire, sent the key's later rows first.
        seq, settled = self.db.submit_seq(
            lambda _s: self.tasks.settle(landed, decisions, report), urgent=not decisions.held_keys
        )
        self.pipeline.hold(decisions.held_keys, seq)
        self.settling.append(settled)
        if decisions.unavailable is not None:
            self._discard_prefetch()

    def _breaker(self, decisions: Decisions) -> None:
        relay = self.relay
        if decisions.unavailable is not None:
            pause = relay.breaker.record_unavailable(relay._clock(), relay._rand)
            log.warning(
                "broker unavailable (%s); %s handed back, next try in %.1f s",
                decisions.unavailable.error,
                count(len(decisions.release), "message"),
                pause,
            )
        elif decisions.sent:
            if relay.breaker.is_open:
                log.info("broker is reachable again")
            relay.breaker.record_success()

    def _discard_prefetch(self) -> None:
        """Hand back the queued claims: they will not be sent."""
        while self.prefetch:
            _, pending = self.prefetch.popleft()
            try:
                batch = self._result(pending)
            except Exception:
                log.debug("a discarded claim had failed", exc_info=True)
                continue
            if batch.rows:
                ids = [row.id for row in batch.rows]
                self.db.submit(partial(self.tasks.release, batch.token, ids))

    def _drain(self) -> None:
        """Land everything on the wire and hand back the claimed batch (broker down)."""
        while len(self.pipeline):
            self._land()
        self._discard_prefetch()

    def _collect(self, block: bool) -> None:
        """Add finished settles to the totals; a failed one is database trouble."""
        while self.settling and (block or self.settling[0].done()):
            try:
                self.totals.add(self._result(self.settling.popleft()))
            except Exception as exc:
                # Its rows stay leased by this relay, which sends them again (at least once).
                self._database_trouble(exc)

    def _idle(self, empty_claim: float | None) -> None:
        """Wait for rows; ``empty_claim``: when the claim that found none began."""
        idle.maintain(self.relay, self.db)
        self._wait(idle.next_wait(self.relay, self.db, empty_claim))

    def _database_trouble(self, exc: Exception) -> None:
        diagnosis = diagnose(exc, db_url=self.relay.engine.url.render_as_string())
        if isinstance(diagnosis, TablesMissing):
            raise diagnosis from exc  # waiting would not bring the tables
        if self.once:
            raise exc
        # What the operator can do about it, when known (a read-only database: the primary).
        self._wait(self.outage.failed(diagnosis or exc, self.relay.name))

    def _result(self, future: Future[T]) -> T:
        return self.db.result(future, self.relay._stop)

    def _abandoned(self) -> None:
        if self.db.abandoned:
            log.warning(
                "relay %s: the database did not answer within %.0f s of the stop; stopping "
                "without it (the rows this relay claimed are sent again once its lease ends)",
                self.relay.name,
                STOP_GRACE,
            )

    def _wait(self, timeout: float) -> None:
        if self.waiter is None:
            self.relay._stop.wait(timeout)
        else:
            self.waiter.wait(timeout, self.relay._stop)

    def _shut_down(self) -> None:
        try:
            while len(self.pipeline):
                self._land()
            self._discard_prefetch()
            self._collect(block=True)
        except Abandoned:
            pass
        except Exception as exc:
            log.debug("settling the batches in flight failed", exc_info=True)
            log.warning("settling the batches in flight failed (%s)", one_line(exc))
        finally:
            try:
                self._result(self.db.submit(lambda _seq: self.liveness.stop()))
            except Abandoned:
                pass
            except Exception:
                log.debug("could not deregister", exc_info=True)
            # A database thread stuck on a database that does not answer is left behind
            # (a daemon thread): its connection goes with the process, or fails later.
            self._abandoned()
            if self.db.abandoned:
                # The thread left behind deregisters this run's id and drops its lock when
                # the database answers: a later run of this relay goes on under a new id.
                self.relay.liveness = self.liveness.renewed()
            self.db.shutdown(timeout=0 if self.db.abandoned else None)


def _with_dead_letter_span(dead: relay_store.DeadLetterRow) -> relay_store.DeadLetterRow:
    attributes = {"outboxer.dead_letter.origin": "relay", "error.type": dead.error_type}
    with instrumentation.get().step("dead_letter", dead.claimed.envelope, attributes) as span:
        return replace(dead, trace=span.trace_headers())
