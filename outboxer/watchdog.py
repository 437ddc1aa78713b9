"""Handler runs that do not end: a warning in the log, and the answer of ``/live``.

Python cannot stop a thread, so a handler that never returns (an HTTP call without a
timeout, a lock wait) holds its worker for ever. The runner records each run here as it
starts (one dict write, one delete when it ends: :meth:`Watch.started`,
:meth:`Watch.ended`); a task on the runner's loop looks at them every second or so:

* a run longer than ``slow_handler_warning`` seconds logs one WARNING naming the consumer,
  the handlers, the messages and how long, then again once it has run twice as long;
* :meth:`Watch.stalled` tells the liveness probe (through :mod:`outboxer.heartbeat`)
  when every worker is in a run, and since when the youngest of them runs: with every
  worker hung the consumer processes nothing while its loop still turns.

A run that waits out a database outage (:mod:`outboxer.outage_hold`) is not counted
while it waits, and its clock starts again when it tries again: a liveness probe must not
restart a process for an outage it is already waiting out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from . import heartbeat, wire
from .handlers import HandlerRegistry
from .outage_hold import OutageHold
from .redaction import printable
from .transports.base import Delivery

__all__ = ["Run", "Watch"]

log = logging.getLogger("outboxer.consumer")


class Options(Protocol):
    """What the watch takes of the run's options (:class:`~outboxer.runner.RunOptions`)."""

    @property
    def concurrency(self) -> int: ...
    @property
    def slow_handler_warning(self) -> float | None: ...


_SHOWN = 3
"""Message ids a warning names; the others are counted."""


class Run:
    """One handler run in progress: when it started (None while it waits out an outage),
    and its deliveries (one, or a batch)."""

    __slots__ = ("deliveries", "start")

    def __init__(self, deliveries: Sequence[Delivery], start: float | None) -> None:
        self.deliveries = deliveries
        self.start = start

    def wait_out(self, outage: OutageHold, pause: float) -> bool:
        """:meth:`OutageHold.wait`, not counted as a hung handler; trying again after the
        pause is a new run."""
        self.start = None
        waited = outage.wait(pause)
        self.start = time.monotonic()
        return waited

    async def wait_out_async(self, outage: OutageHold, pause: float) -> bool:
        self.start = None
        waited = await outage.wait_async(pause)
        self.start = time.monotonic()
        return waited


class Watch:
    """The runs in progress of one consumer run, and the task that watches them."""

    def __init__(self, name: str, registry: HandlerRegistry, options: Options) -> None:
        self.name = name
        self.concurrency = options.concurrency
        self.registry = registry
        self.threshold = options.slow_handler_warning
        """Seconds a run lasts before it is logged; None: never."""
        self.runs: dict[Delivery, Run] = {}
        """By its first delivery; written by the worker threads (or tasks) only."""
        self._next: dict[Delivery, tuple[float, float]] = {}
        """The run's start, and the age at which it is logged next (the watch task's own)."""

    def started(self, deliveries: Sequence[Delivery], now: float) -> Run:
        run = self.runs[deliveries[0]] = Run(deliveries, now)
        return run

    def ended(self, run: Run) -> None:
        self.runs.pop(run.deliveries[0], None)

    def start(self, key: str) -> asyncio.Task[None]:
        """The watch task, and :func:`heartbeat.stalled` answered for ``key``
        (:mod:`outboxer.heartbeat`) until it is cancelled."""
        return asyncio.create_task(self.keep_watching(key))

    async def keep_watching(self, key: str) -> None:
        """Log the long runs, until cancelled (with the run)."""
        tick = 1.0 if self.threshold is None else min(1.0, max(0.05, self.threshold / 4))
        heartbeat.watch(key, self.stalled)
        try:
            while True:
                await asyncio.sleep(tick)
                try:
                    self.check(time.monotonic())
                except Exception:  # never the end of the watch (nor of the run)
                    log.debug("watching the handler runs failed", exc_info=True)
        finally:
            heartbeat.watch(key, None)

    def check(self, now: float) -> None:
        """One WARNING for each run past the threshold, or past twice its last warning."""
        if self.threshold is None:
            return
        runs = self._snapshot()
        for key in [key for key in self._next if key not in runs]:
            del self._next[key]
        for key, run in runs.items():
            start = run.start
            if start is None:
                continue
            due = self._next.get(key)
            if due is None or due[0] != start:
                due = (start, self.threshold)
            age = now - start
            if age < due[1]:
                self._next[key] = due
                continue
            self._next[key] = (start, age * 2)
            log.warning(
                "consumer %s: %s has been running for %s s on %s; a handler that never "
                "returns holds its worker (concurrency %d, %d busy)",
                self.name,
                self._handlers(run),
                _seconds(age),
                _messages(run.deliveries),
                self.concurrency,
                len(runs),
            )

    def stalled(self, now: float | None = None) -> tuple[float, int, str] | None:
        """``(seconds, workers, what)`` when every worker is in a run: how long the youngest
        of those runs has lasted, the number of workers, and the handlers and messages of
        the runs; None when a worker is free (or waits out an outage)."""
        runs = self._snapshot()
        starts = [run.start for run in runs.values()]
        if len(runs) < self.concurrency or None in starts:
            return None
        now = time.monotonic() if now is None else now
        youngest = max(start for start in starts if start is not None)
        what = "; ".join(
            f"{self._handlers(run, prefix=False)} on {_messages(run.deliveries)}"
            for run in list(runs.values())[:_SHOWN]
        )
        if len(runs) > _SHOWN:
            what += f"; and {len(runs) - _SHOWN} more"
        return now - youngest, self.concurrency, what

    def _snapshot(self) -> dict[Delivery, Run]:
        while True:
            try:  # written by the worker threads meanwhile: copied whole, without a lock
                return dict(self.runs)
            except RuntimeError:  # pragma: no cover - changed size while being copied
                continue

    def _handlers(self, run: Run, prefix: bool = True) -> str:
        names: list[str] = []
        for delivery in run.deliveries:
            for name in self._targets(delivery):
                if name not in names:
                    names.append(name)
        text = printable(", ".join(names) or "an unknown handler", 300)
        if not prefix:
            return text
        return f"handler {text}" if len(names) == 1 else f"handlers {text}"

    def _targets(self, delivery: Delivery) -> list[str]:
        """The handlers a delivery goes to (what the intake would choose, roughly)."""
        headers = delivery.headers
        addressed = headers.get(wire.HANDLER)
        if addressed:
            return [addressed]
        adapter = self.registry.adapter_for(delivery.destination)
        if adapter is not None:
            return [adapter.id]
        return [spec.id for spec in self.registry.by_type.get(headers.get(wire.TYPE, ""), ())]


def _messages(deliveries: Sequence[Delivery]) -> str:
    ids = [printable(d.headers.get(wire.MESSAGE_ID) or "?", 64) for d in deliveries]
    if len(ids) == 1:
        return f"message {ids[0]}"
    shown = ", ".join(ids[:_SHOWN])
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return f"{len(ids)} messages ({shown}{more})"


def _seconds(age: float) -> str:
    return f"{age:.1f}" if age < 10 else f"{age:.0f}"
