"""This relay's identity, the lock that proves it is alive, and which other relays are dead.

A relay gets a random id when it starts; its lease tokens begin with it. It registers in
``outboxer_relay`` and holds a liveness lock on a connection of its own for as long as it
runs (:mod:`outboxer.store.liveness`). Every ``interval`` seconds it

* checks that its own lock connection is still there; if the database dropped it (a
  restart, a network cut), other relays may already count this one as dead and take its
  rows, so it starts again under a new id (its batches in flight keep their tokens);
* refreshes its heartbeat, and the list of relays that are registered but hold no lock:
  their leases are free at once, instead of after ``lease`` seconds;
* forgets relays dead for longer than a lease (none of their leases can be left);
* counts the live relays and its rank among them, so that relays share the keys
  (:attr:`Liveness.share`).

A relay limited to destinations (a consumer's own, :mod:`outboxer.relay.embedded`) takes
no share, and the others leave it out of their count: it would never claim the keys of a
share, which would then wait until the share's relay had nothing else to send. Its id
ends with ``x`` (not a hexadecimal digit) so that every relay can tell it apart.
"""

from __future__ import annotations

import logging
import secrets
import threading

from sqlalchemy.engine import Connection, Engine

from ..store import liveness as liveness_store
from ..store.leases import RELAY_ID_LENGTH

__all__ = ["Liveness"]

log = logging.getLogger("outboxer.relay")


class Liveness:
    """Registration, the liveness lock and the list of dead relays, for one relay."""

    def __init__(self, engine: Engine, name: str, lease: float, *, limited: bool = False) -> None:
        self.engine = engine
        self.name = name
        self.lease = lease
        self.limited = limited
        """This relay sends some destinations only: it takes no share of the keys."""
        self.relay_id = _new_id(limited)
        self._connection: Connection | None = None
        self._dead: tuple[str, ...] = ()
        self._share: tuple[int, int] | None = None
        self._lock = threading.Lock()

    @property
    def dead(self) -> tuple[str, ...]:
        """Ids of relays whose leases are free because they are gone."""
        return self._dead

    @property
    def share(self) -> tuple[int, int] | None:
        """(this relay's rank, the number of live relays) when several relays run, else None:
        each relay prefers the keys of its own share (see :mod:`outboxer.store.claims`)."""
        return self._share

    def renewed(self) -> Liveness:
        """A liveness for the same relay under a new id, sharing nothing with this one (whose
        connection a thread left behind may still use)."""
        return Liveness(self.engine, self.name, self.lease, limited=self.limited)

    def start(self) -> None:
        """Register and take the lock (under a fresh id if this one is taken)."""
        with self._lock:
            self._close()
            connection = self.engine.connect()
            try:
                while not liveness_store.lock(connection, self.relay_id):
                    self.relay_id = _new_id(self.limited)  # 32 random bits collided: draw again
                liveness_store.register(connection, self.relay_id, self.name)
            except BaseException:
                connection.close()
                raise
            self._connection = connection

    def check(self) -> None:
        """Verify the lock is still held, beat, and refresh the dead list (database thread)."""
        with self._lock:
            connection = self._connection
        if connection is not None and not _alive(connection):
            old = self.relay_id
            self.relay_id = _new_id(self.limited)
            self._close()
            log.warning(
                "relay %s lost its database session (and with it its liveness lock); "
                "going on as %s",
                old,
                self.relay_id,
            )
            connection = None
        if connection is None:
            self.start()
            connection = self._connection
            assert connection is not None
        liveness_store.heartbeat(connection, self.relay_id)
        dead = liveness_store.dead_relays(connection, self.relay_id)
        if dead:
            gone = liveness_store.seen_before(connection, self.lease + 5.0)
            liveness_store.forget(connection, [r for r, seen in dead.items() if seen < gone])
            new = sorted(set(dead) - set(self._dead))
            if new:
                log.info("relays gone, their leases are free: %s", ", ".join(new))
        self._dead = tuple(dead)
        live = sorted({*liveness_store.registered(connection), self.relay_id} - set(dead))
        sharing = [relay for relay in live if not _is_limited(relay)]
        if self.limited or len(sharing) < 2:
            self._share = None
        else:
            self._share = (sharing.index(self.relay_id), len(sharing))

    def stop(self) -> None:
        """Deregister and drop the lock."""
        with self._lock:
            connection = self._connection
            if connection is not None:
                try:
                    liveness_store.deregister(connection, self.relay_id)
                except Exception:  # the database may be gone; the lock goes with the session
                    log.debug("could not deregister relay %s", self.relay_id, exc_info=True)
            self._close()

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                log.debug("closing the liveness connection failed", exc_info=True)


def _alive(connection: Connection) -> bool:
    try:
        connection.exec_driver_sql("SELECT 1").scalar()
        connection.commit()
    except Exception:
        return False
    return True


_LIMITED = "x"
"""The last character of a limited relay's id (a full relay's id is hexadecimal)."""


def _new_id(limited: bool = False) -> str:
    drawn = secrets.token_hex(RELAY_ID_LENGTH // 2)
    return drawn[:-1] + _LIMITED if limited else drawn


def _is_limited(relay_id: str) -> bool:
    return relay_id.endswith(_LIMITED)
