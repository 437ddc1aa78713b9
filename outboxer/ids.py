"""Time-ordered message ids (UUID version 7, RFC 9562)."""

from __future__ import annotations

import os
import threading
import time
import uuid

__all__ = ["uuid7"]

_COUNTER_BITS = 12  # rand_a holds a counter so ids from one process sort in creation order
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1


class _Uuid7Generator:
    """RFC 9562 method 1: a 12-bit counter in ``rand_a``, seeded randomly each millisecond."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def __call__(self) -> uuid.UUID:
        rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                # Seed in the lower half so a burst has room to grow within the millisecond.
                self._counter = int.from_bytes(os.urandom(2), "big") & (_COUNTER_MAX >> 1)
            else:
                # Same millisecond, or the clock stepped back: advance the counter to keep order.
                self._counter += 1
                if self._counter > _COUNTER_MAX:
                    self._last_ms += 1
                    self._counter = 0
            ms, counter = self._last_ms, self._counter
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= counter << 64
        value |= 0b10 << 62
        value |= rand_b
        return uuid.UUID(int=value)


uuid7 = _Uuid7Generator()
"""Return a new UUIDv7: 48-bit Unix milliseconds, a counter, then 62 random bits.

Ids made by one process are strictly increasing; ids from different processes sort by
millisecond."""
