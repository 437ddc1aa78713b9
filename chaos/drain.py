"""A drain under test: messages committed to a database, a collector on the broker, relay
processes, and the loops that inject faults one after another and time each recovery."""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from .collectors import RabbitCollector, SQSCollector, wait_until
from .ledger import Figures, Ledger
from .world import RelayProcess, backlog, publish

SETTLE = 0.25  # seconds in which what was already at the broker reaches the collector


@dataclass
class Drain:
    """One scenario's world. ``relays`` are stopped (SIGTERM) by :meth:`finish`."""

    name: str
    db_url: str
    destination: str
    expected: dict[str, int]
    ledger: Ledger
    waiting: Callable[[], int] = lambda: 0  # messages in the broker's queue, not yet collected
    relays: list[RelayProcess] = field(default_factory=list)
    recoveries: list[float | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def published(self) -> int:
        return sum(self.expected.values())

    def pending(self) -> set[str]:
        return self.ledger.pending_keys(self.expected)

    def wait_started(self, fraction: float = 0.0, timeout: float = 120) -> None:
        """Until the relays delivered more than ``fraction`` of the messages."""
        if not wait_until(lambda: self.ledger.delivered > fraction * self.published, timeout):
            raise RuntimeError(f"{self.name}: nothing delivered within {timeout:g} s")

    def settle(self, timeout: float = 300) -> None:
        """Until the collector has everything the broker holds (nothing new is being sent:
        after a kill). moto can take a minute to hand out what a dead relay sent; counting
        those late arrivals as the new relay's progress would flatter the recovery."""
        wait_until(
            lambda: self.waiting() == 0 and time.monotonic() - self.ledger.last_arrival > SETTLE,
            timeout,
            0.05,
        )

    def recovered(
        self, since: float, keys: set[str], timeout: float, settle: float = SETTLE
    ) -> float | None:
        """Time one recovery: every key of ``keys`` delivers something new after ``since``
        (arrivals within ``settle`` seconds were in flight before the fault).

        A key that has delivered all its messages meanwhile has nothing left to recover:
        it counts at its last delivery. (A fast relay can finish a key within ``settle``
        of the fault; waiting for a later first delivery of it would never end.)"""
        deadline = since + timeout
        while True:
            live = keys & self.pending()
            took = self.ledger.progressed(live, since, settle) if live else 0.0
            if took is not None:
                finished = self.ledger.last_first_delivery(keys - live, since)
                took = max(took, finished or 0.0)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.recoveries.append(took)
        return took

    def finish(self, timeout: float = 600, **extra: object) -> Figures:
        """Wait for the outbox to drain and the collector to go quiet, stop the relays,
        and compute the figures."""
        drained = wait_until(lambda: backlog(self.db_url) == 0, timeout, interval=0.5)
        self.ledger.wait_quiet(self.published, timeout=600 if drained else 5)
        if not drained:
            self.notes.append(
                f"{backlog(self.db_url)} rows still in the outbox after {timeout:g} s"
            )
        for relay in self.relays:
            status = relay.stop()
            if status not in (0, None, -signal.SIGTERM):  # -SIGTERM: stopped while starting
                self.notes.append(f"{relay.name} exited with status {status}")
        return self.ledger.figures(
            self.name,
            self.published,
            faults=len(self.recoveries),
            recoveries=self.recoveries,
            seconds=round(time.monotonic() - self.started, 1),
            notes=self.notes,
            extra={"relay_logs": [r.log.name for r in self.relays], **extra},
        )


def rabbitmq_drain(
    name: str, db_url: str, rabbitmq_url: str, messages: int, keys: int
) -> AbstractContextManager[Drain]:
    """``messages`` committed over ``keys`` keys for a fresh exchange, and a collector on it
    (connected straight to ``rabbitmq_url``, never through a proxy)."""
    destination = f"chaos-{name}-{uuid.uuid4().hex[:6]}"
    return collected_drain(
        name,
        db_url,
        destination,
        messages,
        keys,
        lambda ledger: RabbitCollector(rabbitmq_url, destination, ledger),
    )


def sqs_drain(
    name: str, db_url: str, endpoint: str, messages: int, keys: int
) -> AbstractContextManager[Drain]:
    """The same on an SQS FIFO queue of moto's server at ``endpoint``."""
    destination = f"chaos-{name}-{uuid.uuid4().hex[:6]}.fifo"
    return collected_drain(
        name,
        db_url,
        destination,
        messages,
        keys,
        lambda ledger: SQSCollector(endpoint, destination, ledger),
    )


class Collector(Protocol):
    def waiting(self) -> int: ...
    def close(self) -> None: ...


@contextmanager
def collected_drain(
    name: str,
    db_url: str,
    destination: str,
    messages: int,
    keys: int,
    collector: Callable[[Ledger], Collector],
) -> Iterator[Drain]:
    """Start the collector (so its queue exists before anything is sent), then publish."""
    ledger = Ledger()
    collecting = collector(ledger)
    try:
        expected = publish(db_url, destination, messages, keys)
        yield Drain(name, db_url, destination, expected, ledger, collecting.waiting)
    finally:
        collecting.close()


def kill_loop(
    drain: Drain,
    relay: RelayProcess,
    kills: int,
    rng: random.Random,
    recover_timeout: float,
    spacing: tuple[int, int] = (0, 4000),
) -> None:
    """SIGKILL the relay at a random moment, restart it at once, time how long until every
    key that had messages left delivers again (recovery counts from the restart).

    The moment is drawn in messages, not seconds (0 to 4,000 more deliveries after the
    last recovery by default), so that the kills fall inside the drain at any speed.
    """
    for _ in range(kills):
        target = drain.ledger.delivered + rng.randrange(*spacing)

        def reached(t: int = target) -> bool:
            relay.check_alive()
            return drain.ledger.delivered >= t or not drain.pending()

        wait_until(reached, 600, 0.01)
        if not drain.pending():
            drain.notes.append(f"drained after {len(drain.recoveries)} kills")
            return
        relay.kill()
        drain.settle()  # what the dead relay put at the broker is collected first
        keys = drain.pending()
        restarted = relay.start()
        if not keys:  # the dead relay had sent everything: nothing to recover
            drain.notes.append(f"drained after {len(drain.recoveries)} kills")
            return
        drain.recovered(restarted, keys, recover_timeout, settle=0.0)


def cut_loop(
    drain: Drain,
    arm: Callable[[random.Random], threading.Event],
    cuts: int,
    rng: random.Random,
    recover_timeout: float,
    fire_timeout: float = 60,
) -> None:
    """Arm a cut (``arm`` returns the proxy's Event), wait for it to fire, time the
    recovery from that moment; repeat."""
    for i in range(cuts):
        if not drain.pending():
            drain.notes.append(f"drained after {i} cuts")
            return
        fired = arm(rng)
        deadline = time.monotonic() + fire_timeout
        while not fired.wait(0.2):
            if not drain.pending():
                drain.notes.append(f"drained after {i} cuts (the last one never fired)")
                return
            if time.monotonic() > deadline:
                drain.notes.append(f"cut {i + 1} did not fire within {fire_timeout:g} s (stall?)")
                return
        cut_at = time.monotonic()
        drain.recovered(cut_at, drain.pending(), recover_timeout)
