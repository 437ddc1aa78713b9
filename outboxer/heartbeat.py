"""Liveness of the long-running loops: each turn of a loop records a beat.

The relay's and the consumer's loops call ``heartbeat.beat(KEY)`` once per turn (one line
each), with ``KEY`` ``f"relay {relay.name}"`` or ``f"consumer {consumer.name}"``;
``outboxer relay --health-port`` and ``outboxer-inbox --health-port`` answer the liveness
probe from :func:`seconds_since`. A loop that waits (idle, or backing off from an outage)
still turns at least every 30 seconds or so, so a beat older than the liveness timeout
means the loop is stuck, not merely idle.
"""

from __future__ import annotations

import threading
import time

__all__ = ["beat", "seconds_since"]

_beats: dict[str, float] = {}
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
