"""Stopping a run: the stop request, and the pauses it cuts short.

A consumer's delivery loop (:mod:`outboxer.runner`) and its scheduled handlers
(:mod:`outboxer.scheduling`) pause after a broker or database outage, for
:data:`OUTAGE_BACKOFF`'s growing delays; :meth:`StopSignal.set`, from any thread, ends
every such pause at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from .retry import Backoff

__all__ = ["OUTAGE_BACKOFF", "StopSignal"]

OUTAGE_BACKOFF = Backoff(initial=0.5, multiplier=2.0, max_delay=30.0, jitter=0.1)
"""Pauses while the broker cannot be reached or outcomes cannot be recorded."""


class StopSignal:
    """A stop request that any thread may set and that wakes the loop's pauses at once."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def set(self) -> None:
        self._flag.set()
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(event.set)

    def clear(self) -> None:
        self._flag.clear()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def wait(self, seconds: float) -> bool:
        """Block this thread ``seconds``, or less if a stop is requested; whether it was."""
        return self._flag.wait(seconds)

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a stop is requested meanwhile."""
        if self.is_set() or seconds <= 0:
            return
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.append(entry)
        try:
            if self.is_set():
                return
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(entry[1].wait(), seconds)
        finally:
            with self._lock:
                self._waiters.remove(entry)
