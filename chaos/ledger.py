"""What the consumer saw, and the figures of a scenario computed from it.

Every message of a chaos run has a body ``{"key": ..., "seq": ..., "n": ...}``: ``n`` is
unique in the run, ``seq`` counts the messages of ``key`` in commit order. A collector
records each delivery (arrival time, n, key, seq) as the broker hands it over, in arrival
order; the figures follow from that record and from what was published:

* delivered: distinct ``n`` seen; lost: published and never seen; duplicated: deliveries
  of an ``n`` already seen (the relay sent it twice; a consumer-side redelivery of a
  message already recorded is not counted, see the collectors);
* order violations: first deliveries of a key whose ``seq`` is lower than one already
  delivered for that key (the first delivery of each message must follow commit order);
* recovery: after a fault ends, seconds until every key that still had messages to
  deliver delivers a new one (``None``: it did not within the time allowed). Messages
  already at the broker when the fault struck arrive within milliseconds and would make
  every key look recovered at once, so arrivals in the first ``settle`` seconds (0.25 s)
  after the fault are not counted: that is the resolution of the figure.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figures:
    """One scenario's result, as printed and written to the JSON file."""

    scenario: str
    published: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    order_violations: int = 0
    faults: int = 0
    recoveries: list[float | None] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def recovery_max(self) -> float | None:
        """The slowest recovery; infinite when a recovery did not happen in time."""
        if not self.recoveries:
            return None
        return max(float("inf") if r is None else r for r in self.recoveries)

    @property
    def recovery_median(self) -> float | None:
        done = [r for r in self.recoveries if r is not None]
        return statistics.median(done) if done else None

    @property
    def ok(self) -> bool:
        """No loss and no order violation (what makes ``python -m chaos`` exit non-zero)."""
        return self.lost == 0 and self.order_violations == 0 and self.published > 0

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["recovery_max"] = self.recovery_max
        data["recovery_median"] = self.recovery_median
        if data["recovery_max"] == float("inf"):
            data["recovery_max"] = None
        data["ok"] = self.ok
        return data


class Ledger:
    """Deliveries in arrival order; safe to feed from collector threads while others read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: set[int] = set()
        self.duplicates = 0
        self.first: dict[str, list[tuple[float, int]]] = {}  # key -> [(arrived, seq)]
        self.last_arrival = 0.0

    def record(self, body: bytes, redelivered: bool = False) -> None:
        """One delivery; ``redelivered``: the broker gave it to a consumer before (RabbitMQ),
        so seeing it again says nothing about the relay."""
        message = json.loads(body)
        now = time.monotonic()
        with self._lock:
            self.last_arrival = now
            n = int(message["n"])
            if n in self.seen:
                if not redelivered:
                    self.duplicates += 1
                return
            self.seen.add(n)
            self.first.setdefault(str(message["key"]), []).append((now, int(message["seq"])))

    @property
    def delivered(self) -> int:
        with self._lock:
            return len(self.seen)

    def pending_keys(self, expected: dict[str, int]) -> set[str]:
        """Keys that still have messages to deliver."""
        with self._lock:
            return {k for k, n in expected.items() if len(self.first.get(k, ())) < n}

    def progressed(self, keys: set[str], since: float, settle: float = 0.0) -> float | None:
        """Seconds from ``since`` until each of ``keys`` had a first delivery after it; None
        while one has not. Arrivals in the first ``settle`` seconds do not count: they are
        messages that were already at the broker when the fault struck."""
        latest = since + settle
        with self._lock:
            for key in keys:
                after = [t for t, _ in self.first.get(key, ()) if t > since + settle]
                if not after:
                    return None
                latest = max(latest, min(after))
        return latest - since

    def last_first_delivery(self, keys: set[str], since: float) -> float | None:
        """Seconds from ``since`` to the latest first delivery after it among ``keys``."""
        with self._lock:
            times = [t for key in keys for t, _ in self.first.get(key, ()) if t > since]
        return max(times) - since if times else None

    def wait_progress(
        self, keys: set[str], since: float, timeout: float, settle: float = 0.0
    ) -> float | None:
        """Poll :meth:`progressed` until it answers or ``timeout`` passes."""
        deadline = since + timeout
        while True:
            took = self.progressed(keys, since, settle)
            if took is not None or time.monotonic() > deadline:
                return took
            time.sleep(0.05)

    def wait_quiet(
        self, total: int, timeout: float, quiet: float = 2.0, stuck: float = 30.0
    ) -> None:
        """Until ``total`` distinct messages arrived and nothing more came for ``quiet``
        seconds (duplicates may trail); or nothing at all came for ``stuck`` seconds; or
        ``timeout``. A slow broker (moto) that still hands out messages is waited for."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = time.monotonic() - self.last_arrival
                done = len(self.seen) >= total
            if (done and idle >= quiet) or idle >= stuck:
                return
            time.sleep(0.1)

    def order_violations(self) -> int:
        """First deliveries that came after a later message of their key."""
        violations = 0
        with self._lock:
            for arrivals in self.first.values():
                highest = -1
                for _, seq in arrivals:
                    if seq < highest:
                        violations += 1
                    highest = max(highest, seq)
        return violations

    def figures(self, scenario: str, published: int, **values: Any) -> Figures:
        delivered = self.delivered
        return Figures(
            scenario,
            published=published,
            delivered=delivered,
            lost=published - delivered,
            duplicated=self.duplicates,
            order_violations=self.order_violations(),
            **values,
        )
