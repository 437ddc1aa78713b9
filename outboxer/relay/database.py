"""The relay's database work: one thread, in order, and how an outage is waited out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..retry import Backoff

__all__ = ["DATABASE_BACKOFF", "DatabaseThread", "Outage"]

log = logging.getLogger("outboxer.relay")

T = TypeVar("T")

DATABASE_BACKOFF = Backoff(initial=0.2, multiplier=2.0, max_delay=10.0, jitter=0.2)
"""Pauses while the database is unreachable: 0.2 s doubling to 10 s, jitter included (a
database that comes back is used again within seconds; one log line per try)."""


class DatabaseThread:
    """One worker thread for the relay's database work, in submission order.

    Every task gets a sequence number and is called with it: tasks run in that order, so a
    claim submitted after a settle sees what the settle wrote.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="outboxer-relay-db")
        self._seq = 0

    def submit_seq(self, fn: Callable[[int], T]) -> tuple[int, Future[T]]:
        self._seq += 1
        return self._seq, self._pool.submit(fn, self._seq)

    def submit(self, fn: Callable[[int], T]) -> Future[T]:
        return self.submit_seq(fn)[1]

    def call(self, fn: Callable[[], T]) -> T:
        return self.submit(lambda _seq: fn()).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class Outage:
    """Database trouble: the pause before each retry, and one log line per retry."""

    def __init__(self, rand: Callable[[], float]) -> None:
        self._rand = rand
        self.failures = 0
        self._since = 0.0

    def failed(self, exc: BaseException, relay: str) -> float:
        self.failures += 1
        pause = DATABASE_BACKOFF.delay(self.failures, self._rand)
        if self.failures == 1:
            self._since = time.monotonic()
            log.debug("relay %s: the database failed", relay, exc_info=exc)
        log.warning(
            "relay %s: database trouble (%s); trying again in %.1f s",
            relay,
            one_line(exc),
            pause,
        )
        return pause

    def recovered(self) -> None:
        if self.failures:
            log.info(
                "the database is reachable again (after %s in %.1f s)",
                count(self.failures, "failed attempt"),
                time.monotonic() - self._since,
            )
            self.failures = 0


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: first line of its message``, for a log line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def count(n: int, noun: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
