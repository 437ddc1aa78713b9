"""The relay's database work, one task at a time on its database thread: claim a batch,
settle a landed one, hand rows back, renew the leases of the batches on the wire, and
check the relay's liveness.

:class:`~outboxer.relay.runner.Run` decides when each task runs and in which order (the
order is part of the ordering rule, :mod:`outboxer.relay.pipeline`); the tasks themselves
only talk to the database, log what they did and report it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .. import instrumentation
from ..store import claims, settle
from ..store.leases import LeaseScope
from .database import Abandoned, DatabaseThread, count
from .decide import Decisions
from .failures import SendFailure
from .liveness import Liveness
from .pipeline import Batch, Landed
from .reports import BatchReport

if TYPE_CHECKING:
    from .relay import Relay

__all__ = ["Tasks"]

log = logging.getLogger("outboxer.relay")


class Tasks:
    """The database tasks of one run (called on its database thread, with the task's
    sequence number)."""

    def __init__(self, relay: Relay, liveness: Liveness, db: DatabaseThread) -> None:
        self.relay = relay
        self.liveness = liveness
        self.db = db

    def claim(self, owner: str, in_flight: list[str], seq: int) -> Batch:
        """Lease the next batch under ``owner``; ``in_flight``: the lease tokens of the
        batches ahead of it (their rows do not hold back their keys)."""
        if self.db.abandoned:
            raise Abandoned  # left behind: nobody would send the rows it leased
        relay = self.relay
        scope = LeaseScope(
            relay=self.liveness.relay_id,
            in_flight=in_flight,
            dead=self.liveness.dead,
            destinations=relay.destinations,
            share=self.liveness.share,
        )
        started = time.perf_counter()
        with relay.connect() as connection:
            rows = claims.claim_batch(
                connection,
                owner=owner,
                scope=scope,
                limit=relay.batch_size,
                lease_seconds=relay.lease,
                max_bytes=relay.batch_bytes,
            )
        return Batch(rows, owner, time.perf_counter() - started, started, seq)

    def settle(self, landed: Landed, decisions: Decisions, report: BatchReport) -> BatchReport:
        """Write a landed batch's outcome, then log and report it."""
        relay = self.relay
        started = time.perf_counter()
        with relay.connect() as connection:
            settle.settle(
                connection,
                owner=landed.batch.token,
                sent=decisions.sent,
                retry=decisions.retry,
                dead=decisions.dead,
                release_ids=decisions.release,
                keep_sent=relay.retention is not None,
            )
        report.settle_seconds = time.perf_counter() - started
        for dead in decisions.dead:
            envelope = dead.claimed.envelope
            log.warning(
                "message %s (%s to %r) dead-lettered after %s: %s: %s",
                envelope.message_id,
                envelope.type,
                envelope.destination,
                count(dead.attempts, "attempt"),
                dead.error_type,
                dead.error,
            )
        relay.notify_failures(
            [
                SendFailure(d.claimed.envelope, d.error_type, d.error, d.attempts)
                for d in decisions.dead
            ]
        )
        if decisions.unroutable_retries:
            log.warning(
                "%s could not be routed (no queue is bound for it yet: start its consumer); "
                "retrying with backoff before dead-lettering",
                count(decisions.unroutable_retries, "message"),
            )
        relay.stats.add(report)
        instrumentation.get().relay_batch(
            sent=report.sent,
            retried=report.retried,
            dead_lettered=report.dead_lettered,
            duration=report.seconds,
        )
        log.info("%s", report.line())
        return report

    def release(self, owner: str, ids: list[int], _seq: int = 0) -> None:
        """Hand back rows leased under ``owner`` that will not be sent now."""
        try:
            with self.relay.connect() as connection:
                settle.release(connection, owner=owner, ids=ids)
        except Exception:  # the rows stay leased by this relay and count as free for it
            log.debug("could not hand back %d rows", len(ids), exc_info=True)

    def renew(self, owners: list[str], _seq: int) -> None:
        """Extend the leases of ``owners`` (the batches on the wire and the claims queued
        behind them) while the broker holds their answers."""
        try:
            with self.relay.connect() as connection:
                settle.renew(connection, owners=owners, lease=self.relay.lease)
        except Exception as exc:  # the next claim or settle meets the same trouble
            log.debug("could not renew the leases of the batches on the wire", exc_info=exc)

    def check_liveness(self, _seq: int) -> None:
        if self.db.abandoned:
            return  # left behind: a heartbeat would keep a stopped relay alive
        try:
            self.liveness.check()
        except Exception:  # the next claim meets the same trouble and reports it
            log.debug("the liveness check failed", exc_info=True)
