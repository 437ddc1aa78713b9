"""How an idle relay waits: a PostgreSQL LISTEN, or plain polling.

On PostgreSQL (psycopg 3) the relay LISTENs on the outbox channel on a dedicated
connection, so a commit that published wakes it at once; the timeout is the polling
fallback, which every database gets. A lost LISTEN connection (database restart) is
reopened on the next wait; until then the relay polls.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.engine import Engine

from .store import NOTIFY_CHANNEL

__all__ = ["ListenWaiter", "PollWaiter", "Waiter", "make_waiter"]

log = logging.getLogger("outboxer.relay")

_SLICE = 0.5
"""Longest uninterrupted wait on a LISTEN socket, so stop() is honoured promptly."""


class Waiter:
    """Waits until woken, notified, or timed out."""

    def __init__(self) -> None:
        self._wake = threading.Event()

    def wait(self, timeout: float, stop: threading.Event) -> None:
        if not stop.is_set():
            self._wake.wait(timeout)
        self._wake.clear()

    def wake(self) -> None:
        """Cut the current wait short (from any thread)."""
        self._wake.set()

    def close(self) -> None:
        pass


class PollWaiter(Waiter):
    """Polling only (MariaDB, SQLite, or PostgreSQL with ``listen=False``)."""


class ListenWaiter(Waiter):
    """LISTEN on PostgreSQL; falls back to polling while the connection is down.

    A wait always lasts its whole ``timeout`` unless a notification, :meth:`wake` or the
    stop event ends it: when the LISTEN connection cannot be made, the rest of the time is
    spent waiting, not retrying (the relay's back-off decides how often it tries).
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine
        self._conn: Any = None
        self._down = False

    def _connection(self) -> Any:
        if self._conn is None:
            import psycopg

            url = self._engine.url.set(drivername="postgresql")
            conninfo = url.render_as_string(hide_password=False)
            conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._conn = conn
            if self._down:
                log.info("LISTEN connection is back")
                self._down = False
        return self._conn

    def wait(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and not self._wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                conn = self._connection()
                notified = False
                for _ in conn.notifies(timeout=min(remaining, _SLICE), stop_after=1):
                    notified = True
                if notified:
                    # Drain the rest so one burst of commits costs one wake-up.
                    for _ in conn.notifies(timeout=0.0):
                        pass
                    break
            except Exception as exc:
                self.close()
                if not self._down:
                    self._down = True
                    # One line: the relay logs the outage's traceback (at debug level).
                    log.warning("LISTEN connection lost (%s); polling until it is back", exc)
                self._wake.wait(max(0.0, deadline - time.monotonic()))
                break
        self._wake.clear()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken
                log.debug("closing the LISTEN connection failed", exc_info=True)


def make_waiter(engine: Engine, *, listen: bool) -> Waiter:
    """A LISTEN waiter for PostgreSQL over psycopg 3, polling otherwise."""
    if listen and engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
        return ListenWaiter(engine)
    if listen and engine.dialect.name == "postgresql":
        log.info(
            "LISTEN/NOTIFY needs the psycopg (3) driver, not %s: polling instead",
            engine.dialect.driver,
        )
    return PollWaiter()
