"""The relay's database work: one thread, a settle with nothing to send again first, how
long a stopping relay still waits for it, and how an outage is waited out."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..redaction import one_line
from ..retry import Backoff

__all__ = ["DATABASE_BACKOFF", "STOP_GRACE", "Abandoned", "DatabaseThread", "Outage"]

log = logging.getLogger("outboxer.relay")

T = TypeVar("T")

DATABASE_BACKOFF = Backoff(initial=0.2, multiplier=2.0, max_delay=10.0, jitter=0.2)
"""Pauses while the database is unreachable: 0.2 s doubling to 10 s, jitter included (a
database that comes back is used again within seconds; one log line per try)."""


STOP_GRACE = 10.0
"""Seconds a stopping relay still waits for a database that does not answer (a server hung
on its disk or a lock, a pooler queueing the relay): past them, the database work in
progress is abandoned and the run returns. Nothing is lost: rows it claimed stay leased by
this relay until its lease ends or its death is noticed, then they are sent again."""

_SLICE = 0.5
"""Longest uninterrupted wait for the database thread, so that a stop is noticed."""


class Abandoned(BaseException):
    """The relay is stopping and its database did not answer within :data:`STOP_GRACE` (a
    BaseException: no handler of database trouble may swallow it)."""


class DatabaseThread:
    """One worker thread for the relay's database work.

    Every task gets a sequence number and is called with it. Tasks run in that order, but
    for *urgent* ones, which run before every task not yet started: the relay submits the
    settle of a batch with no keyed row to send again as urgent, so that it does not wait behind
    the claims queued ahead of the loop, and a relay killed then sends again little more
    than what was on the wire (the duplicate window, docs/guarantees.md). A task submitted
    after an urgent one still runs after it.
    """

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._urgent: deque[_Task[Any]] = deque()
        self._queued: deque[_Task[Any]] = deque()
        self._seq = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="outboxer-relay-db", daemon=True)
        self._thread.start()
        self.abandoned = False
        """The database did not answer a stopping relay: its work is left behind."""
        self._grace: float | None = None
        """Seconds a stopping relay may still wait for this thread, all waits together
        (STOP_GRACE once a wait saw the stop; the time spent waiting since is taken off)."""

    def submit_seq(self, fn: Callable[[int], T], *, urgent: bool = False) -> tuple[int, Future[T]]:
        with self._ready:
            if self._closed:
                raise RuntimeError("the relay's database thread is shut down")
            self._seq += 1
            task = _Task(fn, self._seq, Future())
            (self._urgent if urgent else self._queued).append(task)
            self._ready.notify()
        return task.seq, task.future

    def submit(self, fn: Callable[[int], T], *, urgent: bool = False) -> Future[T]:
        return self.submit_seq(fn, urgent=urgent)[1]

    def call(self, fn: Callable[[], T]) -> T:
        return self.submit(lambda _seq: fn()).result()

    def result(self, future: Future[T], stop: threading.Event) -> T:
        """``future``'s result, waiting for this thread as long as it takes, but once
        ``stop`` is set for :data:`STOP_GRACE` more at most, all waits after the stop
        together (then :class:`Abandoned`, and at once for every later wait). Only time
        spent waiting for this thread counts: a stop held up by the broker is not."""
        while not future.done():
            if self.abandoned:
                raise Abandoned
            if not stop.is_set():
                wait_for_futures([future], timeout=_SLICE)
                continue
            if self._grace is None:
                self._grace = STOP_GRACE
            if self._grace <= 0:
                self.abandoned = True
                raise Abandoned
            began = time.monotonic()
            wait_for_futures([future], timeout=self._grace)
            self._grace -= time.monotonic() - began
        return future.result()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Run what is queued, then end the thread; False if it is still busy after
        ``timeout`` seconds (a database that does not answer: the thread is left behind)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not (self._urgent or self._queued or self._closed):
                    self._ready.wait()
                if self._urgent:
                    task = self._urgent.popleft()
                elif self._queued:
                    task = self._queued.popleft()
                else:
                    return
            task.run()


@dataclass
class _Task(Generic[T]):
    fn: Callable[[int], T]
    seq: int
    future: Future[T]

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(self.seq)
        except BaseException as exc:  # the caller reads it from the future
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


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


def count(n: int, noun: str) -> str:
    """``1 message``, ``2 messages``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
