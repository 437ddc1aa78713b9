"""Liveness of the long-running loops: each turn of a loop records a beat.

The relay's and the consumer's loops call ``heartbeat.beat(KEY)`` once per turn (one line
each), with ``KEY`` ``f"relay {relay.name}"`` or ``f"consumer {consumer.name}"``;
``outboxer relay --health-port`` and ``outboxer-inbox --health-port`` answer the liveness
probe from :func:`seconds_since`. A loop that waits (idle, or backing off from an outage)
still turns at least every 30 seconds or so, so a beat older than the liveness timeout
means the loop is stuck, not merely idle.

A consumer's loop turns even when every worker is held by a handler that never returns;
its run registers what :func:`stalled` answers then (:mod:`outboxer.watchdog`): how long
every worker has been in one handler run, if every one is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Stalled", "beat", "seconds_since", "stalled", "watch"]

Stalled = Callable[[], tuple[float, int, str] | None]
"""``(seconds, workers, what)`` while every worker is in a handler run, else None."""

_beats: dict[str, float] = {}
_watches: dict[str, Stalled] = {}
_lock = threading.Lock()


def beat(key: str) -> None:
    """Record that the loop named ``key`` turned just now."""
    now = time.monotonic()
    with _lock:
        _beats[key] = now


def seconds_since(key: str) -> float | None:
    """Seconds since the last beat of ``key``; ``None`` if it never beat."""
    with _lock:
        last = _beats.get(key)
    return None if last is None else time.monotonic() - last


def watch(key: str, workers: Stalled | None) -> None:
    """While a consumer runs, what :func:`stalled` asks about its workers (None: the run
    is over)."""
    with _lock:
        if workers is None:
            _watches.pop(key, None)
        else:
            _watches[key] = workers


def stalled(key: str) -> tuple[float, int, str] | None:
    """``(seconds, workers, what)`` while every worker of the consumer ``key`` is in a
    handler run: how long the youngest of those runs has lasted, how many workers, which
    handlers and messages. None otherwise (a free worker, no run)."""
    with _lock:
        workers = _watches.get(key)
    return None if workers is None else workers()
