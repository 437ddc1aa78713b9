"""What an idle relay does: prune sent rows past their retention now and then, and work
out how long to wait before it claims again."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..redaction import one_line
from ..store import relay as relay_store
from ..store import settle
from .database import DatabaseThread

if TYPE_CHECKING:
    from .relay import Relay

__all__ = ["maintain", "next_wait"]

log = logging.getLogger("outboxer.relay")


def maintain(relay: Relay, db: DatabaseThread) -> None:
    """Periodic housekeeping when idle: prune sent rows past retention (on the database
    thread, so that a database that does not answer cannot hold a stopping relay)."""
    if relay.retention is None:
        return
    now = relay._clock()
    if now - relay._last_prune < relay.prune_interval:
        return
    relay._last_prune = now
    retention = relay.retention

    def prune(_seq: int) -> None:
        with relay.connect() as connection:
            while not relay._stop.is_set():
                pruned = settle.prune_sent(connection, older_than=retention)
                if pruned:
                    log.debug("pruned %d sent rows past retention", pruned)
                if pruned < 1000:
                    break

    try:
        db.result(db.submit(prune), relay._stop)
    except Exception as exc:  # the database may be restarting: one line, as an outage
        log.debug("pruning sent rows failed", exc_info=True)
        log.warning("pruning sent rows failed (%s); trying again later", one_line(exc))


def next_wait(relay: Relay, db: DatabaseThread, empty_claim: float | None) -> float:
    """The poll interval (jittered), or less until the next row this relay may take;
    ``empty_claim``: when the claim that found none began.

    Rows due before a claim that found nothing are rows this relay cannot take (other
    destinations', another live relay's, behind those of their key): counting them, an
    idle relay claimed again at once, hundreds of times a second. Rows of its destinations
    due since, or later, count; a NOTIFY (PostgreSQL) ends any wait."""
    jittered = relay.poll_interval * (0.8 + 0.4 * relay._rand())
    since = None if empty_claim is None else time.perf_counter() - empty_claim

    def next_due(_seq: int) -> float | None:
        with relay.connect() as connection:
            return relay_store.next_due_in(connection, destinations=relay.destinations, since=since)

    try:
        due = db.result(db.submit(next_due), relay._stop)
    except Exception:  # the database may be restarting; the next claim will tell
        log.debug("could not read the next due time; polling", exc_info=True)
        return jittered
    if due is None:
        return jittered
    return max(0.0, min(jittered, due))
