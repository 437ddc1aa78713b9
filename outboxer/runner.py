"""The delivery loop: receive, hand each delivery to a worker, settle it; written once.

There is one loop, and it is async. Sync handlers run in a thread pool of ``concurrency``
threads (``Consumer.run`` is ``asyncio.run`` of this loop), which process, settle and
hand each outcome back to the loop; async handlers run as tasks in the caller's loop
(``Consumer.run_async``). Everything the loop keeps (the deliveries it holds, the
failure streak, the totals) is touched by the loop's thread only, so it needs no lock;
blocking broker calls (receive, acknowledge, extend) go to threads.

Side by side with receiving, one task keeps every held delivery visible
(:mod:`outboxer.visibility`): any delivery held longer than ``extend_after`` (in progress,
or still waiting for a worker) has its visibility extended by ``extend_by`` (SQS), also
while the runner drains on shutdown. Another watches the runs in progress
(:mod:`outboxer.watchdog`): a long one is logged, and ``/live`` fails while every worker
is held by one. Pauses after a broker or database outage end at once
on :meth:`~outboxer.stopping.StopSignal.set`, from any thread (:mod:`outboxer.stopping`;
``StopSignal`` and ``OUTAGE_BACKOFF`` are importable from here too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import heartbeat
from .batching import Batcher
from .diagnosis import diagnose
from .errors import TransportError
from .outage_hold import OutageHold
from .processing import Processor
from .redaction import error_text, one_line, printable
from .reports import ConsumerStats, MessageReport
from .stopping import OUTAGE_BACKOFF, StopSignal
from .transports.base import Delivery, Receiver, Subscription, Transport, acknowledge
from .visibility import extend_all as _extend_all  # noqa: F401 - its name before the split
from .visibility import keep_visible
from .watchdog import Run, Watch

__all__ = ["OUTAGE_BACKOFF", "RunOptions", "Runner", "StopSignal"]

log = logging.getLogger("outboxer.consumer")

Outcome = MessageReport | BaseException
"""A delivery's report (acknowledged), or why it could not be processed (given back)."""


@dataclass(frozen=True)
class RunOptions:
    """How a run consumes: see :meth:`outboxer.Consumer.run`."""

    once: bool = False
    concurrency: int = 1
    idle_timeout: float = 1.0
    prune_interval: float = 300.0
    extend_after: float = 20.0
    extend_by: float = 60.0
    batch_size: int = 1
    """Deliveries a sync worker takes at once (see :mod:`outboxer.batching`)."""
    slow_handler_warning: float | None = 60.0
    """Seconds a handler run lasts before it is logged (:mod:`outboxer.watchdog`)."""


class Runner:
    """One run of a consumer against a transport."""

    def __init__(
        self,
        name: str,
        processor: Processor,
        is_async: bool,
        transport: Transport,
        subscription: Subscription,
        options: RunOptions,
        stop: StopSignal,
        prune: Callable[[], Awaitable[tuple[int, int]]],
        totals: ConsumerStats,
    ) -> None:
        self.name = name
        self.processor = processor
        self.is_async = is_async
        self.transport = transport
        self.subscription = subscription
        self.options = options
        self.stop = stop
        self.prune = prune
        self.totals = totals
        self.stats = ConsumerStats()
        self.window = max(options.concurrency * 2, subscription.prefetch)
        self.batcher = Batcher(processor, transport.description)
        self.pending: deque[Delivery] = deque()
        """Received deliveries no sync worker has taken yet."""
        self.held: dict[Delivery, float] = {}
        """Each held delivery, and when it was received or last extended."""
        self.failures = 0
        self.outage = OutageHold(name, stop, processor, enabled=not options.once)
        """Deliveries whose outcome the database could not take are kept, not given back."""
        self.broker_outages = 0
        self.give_back = False
        self.last_prune = time.monotonic()
        self.limit = asyncio.Semaphore(options.concurrency)
        self.room = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.pool: ThreadPoolExecutor | None = None
        # Sync workers hand their outcomes back here (deque appends are thread-safe).
        self.completed: deque[tuple[Delivery, MessageReport | BaseException | None]] = deque()
        self.wake_lock = threading.Lock()
        self.wake_pending = False
        self.waiting = False
        """The loop waits for room: finished workers wake it, once ``wake_after`` are back."""
        self.wake_after = max(1, self.window // 4)
        self.loop = asyncio.get_running_loop()
        self.watch = Watch(name, processor.registry, options)

    async def run(self) -> ConsumerStats:
        """Consume until stopped (or, with ``once``, until the queue is empty)."""
        receiver = await asyncio.to_thread(self.transport.receiver, self.subscription)
        if not self.is_async:
            self.pool = ThreadPoolExecutor(
                self.options.concurrency, thread_name_prefix=f"outboxer-{self.name}"
            )
        kind = "async handlers" if self.is_async else "handlers"
        log.info("consumer %s started (%s)", self.name, kind)
        extender = asyncio.create_task(
            keep_visible(
                self.held,
                receiver.visibility_timeout,
                self.options.extend_after,
                self.options.extend_by,
            )
        )
        watcher = self.watch.start(f"consumer {self.name}")
        try:
            await self._receive_loop(receiver)
        except BaseException:
            # Cancelled (Ctrl-C in asyncio.run) or failed: a stop all the same, so what no
            # worker started goes back to the broker.
            self.stop.set()
            raise
        finally:
            # Deliveries no worker started yet go back to the broker at once (on stop);
            # the ones in progress finish and are settled, still kept visible meanwhile.
            self.give_back = self.stop.is_set()
            if self.tasks:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            self.waiting, self.wake_after = True, 1  # from now on every outcome wakes the loop
            self._collect()
            while self.held:  # sync workers report back through _collect
                self.room.clear()
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self.room.wait(), 1.0)
                self._collect()
            for task in (extender, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(receiver.close)
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            log.info("consumer %s stopped: %s", self.name, self.stats)
        return self.stats

    async def _receive_loop(self, receiver: Receiver) -> None:
        options = self.options
        while not self.stop.is_set():
            heartbeat.beat(f"consumer {self.name}")  # liveness (--health-port)
            self._collect()
            capacity = self.window - len(self.held)
            if capacity <= 0:
                self.room.clear()
                self.waiting = True
                self._collect()  # what finished before the flag was seen
                if self.window - len(self.held) <= 0:
                    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                        await asyncio.wait_for(self.room.wait(), 1.0)
                self.waiting = False
                continue
            timeout = options.idle_timeout if options.once else 1.0
            try:
                deliveries = await asyncio.to_thread(receiver.receive, capacity, timeout)
            except TransportError as exc:
                if options.once:
                    raise
                await self._broker_down(exc)
                continue
            self.broker_outages = 0
            if not deliveries:
                if options.once:
                    break
                await self._maintain()
                continue
            now = time.monotonic()
            for delivery in deliveries:
                self.held[delivery] = now
            if self.pool is not None:
                # All in the queue first, so that a worker can take a batch of them.
                self.pending.extend(deliveries)
                for _ in deliveries:
                    self.pool.submit(self._work)
            else:
                for delivery in deliveries:
                    task = asyncio.create_task(self._handle(delivery))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
            if self.failures:
                # Outcomes cannot be recorded (the database is down): slow down instead of
                # spinning through redeliveries.
                await self.stop.sleep(OUTAGE_BACKOFF.delay(self.failures))

    async def _handle(self, delivery: Delivery) -> None:
        """An async consumer's task for one delivery."""
        try:
            async with self.limit:
                if self.give_back:
                    await asyncio.to_thread(_settle, delivery.release)  # never started
                    return
                run = self.watch.started((delivery,), time.monotonic())
                try:
                    self._record(await self._process_async(delivery, run))
                finally:
                    self.watch.ended(run)
        finally:
            self.held.pop(delivery, None)
            self.room.set()

    def _work(self) -> None:
        """A sync consumer's worker thread: take up to ``batch_size`` waiting deliveries,
        process and settle them, report back to the loop.

        There is one call per delivery received; a call that finds the queue empty (an
        earlier one took its delivery into a batch) returns at once. Outcomes go back
        through a queue that the loop takes in on each turn; the loop is woken only while
        it waits for room (or drains): a wake-up per message would cost more than the
        work of handing it over.
        """
        batch: list[Delivery] = []
        with contextlib.suppress(IndexError):
            while len(batch) < self.options.batch_size:
                batch.append(self.pending.popleft())
        if not batch:
            return
        outcomes: list[MessageReport | BaseException | None]
        if self.give_back:
            for delivery in batch:
                _settle(delivery.release)  # never started
            outcomes = [None] * len(batch)
        else:
            run = self.watch.started(batch, time.monotonic())
            try:
                if len(batch) == 1:
                    outcomes = [self._process_sync(batch[0], run)]
                else:
                    outcomes = list(self._process_batch(batch, run))
            finally:
                self.watch.ended(run)
        self.completed.extend(zip(batch, outcomes, strict=True))
        if not self.waiting or len(self.completed) < self.wake_after:
            return
        with self.wake_lock:
            if self.wake_pending:
                return
            self.wake_pending = True
        self.loop.call_soon_threadsafe(self._collect)

    def _collect(self) -> None:
        """On the loop: take in what the workers finished."""
        with self.wake_lock:
            self.wake_pending = False
        if not self.completed:
            return
        while self.completed:
            delivery, outcome = self.completed.popleft()
            self.held.pop(delivery, None)
            if outcome is not None:
                self._record(outcome)
        self.room.set()

    def _process_batch(self, batch: list[Delivery], run: Run) -> list[Outcome]:
        outcomes: list[Outcome]
        try:
            outcomes = self.batcher.process(batch)
        except BaseException as exc:
            # Never a delivery left unsettled (the run would wait for it forever): back to
            # the broker; what was committed is a duplicate when it comes again.
            log.exception("consumer %s: processing a batch failed", self.name)
            outcomes = [exc] * len(batch)
        pairs = list(zip(batch, outcomes, strict=True))
        done = [d for d, outcome in pairs if isinstance(outcome, MessageReport)]
        _settle(lambda: acknowledge(done))
        if done:
            self.outage.over()
        failed = [(i, o) for i, o in enumerate(outcomes) if not isinstance(o, MessageReport)]
        pause = self.outage.pause(failed[0][1]) if failed else None
        if pause is not None and run.wait_out(self.outage, pause):
            for i, _ in failed:  # kept through the outage: one at a time from here
                outcomes[i] = self._process_sync(batch[i], run)
            return outcomes
        for i, _ in failed:
            _settle(batch[i].release)
        return outcomes

    def _process_sync(self, delivery: Delivery, run: Run) -> Outcome:
        while True:
            try:
                report = self.processor.process(
                    delivery.body,
                    delivery.headers,
                    delivery.destination,
                    delivery.redelivered,
                    self.transport.description,
                )
            except BaseException as exc:
                pause = self.outage.pause(exc)
                if pause is not None and run.wait_out(self.outage, pause):
                    continue
                delivery.release()
                return exc
            self.outage.over()
            delivery.ack()
            return report

    async def _process_async(self, delivery: Delivery, run: Run) -> Outcome:
        while True:
            try:
                report = await self.processor.process_async(
                    delivery.body,
                    delivery.headers,
                    delivery.destination,
                    delivery.redelivered,
                    self.transport.description,
                )
            except asyncio.CancelledError:
                await asyncio.shield(asyncio.to_thread(_settle, delivery.release))
                raise
            except BaseException as exc:
                pause = await self.outage.pause_async(exc)
                if pause is not None and await run.wait_out_async(self.outage, pause):
                    continue
                await asyncio.to_thread(_settle, delivery.release)
                return exc
            self.outage.over()
            await asyncio.to_thread(_settle, delivery.ack)
            return report

    def _record(self, outcome: MessageReport | BaseException) -> None:
        if isinstance(outcome, MessageReport):
            self.stats.add(outcome)
            self.totals.add(outcome)
            self.failures = 0
            return
        if isinstance(outcome, (KeyboardInterrupt, SystemExit)):
            log.warning(
                "consumer %s: a handler raised %s; stopping (its message goes back to the broker)",
                self.name,
                type(outcome).__name__,
            )
            self.stop.set()
            return
        self.stats.failed_deliveries += 1
        self.failures += 1
        problem = diagnose(outcome) if isinstance(outcome, Exception) else None
        log.warning(
            "consumer %s could not record a message's outcome (%s); giving it back",
            self.name,
            printable(
                str(problem) if problem else f"{type(outcome).__name__}: {error_text(outcome)}", 300
            ),
        )
        if self.failures == 1:  # the traceback once per streak, at debug level
            log.debug("recording the outcome failed", exc_info=outcome)

    async def _broker_down(self, error: TransportError) -> None:
        """The broker could not be reached: wait longer each time, up to 30 s."""
        self.broker_outages += 1
        pause = OUTAGE_BACKOFF.delay(self.broker_outages)
        log.warning(
            "consumer %s cannot reach the broker (%s); trying again in %.1f s",
            self.name,
            printable(str(error), 300),
            pause,
        )
        if self.broker_outages == 1:  # the traceback once per outage, at debug level
            log.debug("receiving failed", exc_info=error)
        await self.stop.sleep(pause)

    async def _maintain(self) -> None:
        now = time.monotonic()
        if now - self.last_prune < self.options.prune_interval:
            return
        self.last_prune = now
        try:
            inbox_rows, dead = await self.prune()
        except Exception as exc:  # the database may be restarting: one line, as an outage
            log.debug("pruning the inbox failed", exc_info=True)
            log.warning(
                "pruning the inbox failed (%s); will try again later",
                printable(f"{type(exc).__name__}: {error_text(exc)}", 300),
            )
            return
        if inbox_rows or dead:
            log.info("pruned %d inbox rows and %d dead letters", inbox_rows, dead)


def _settle(settle: Callable[[], None]) -> None:
    """Acknowledge or give back; a broker that cannot be told redelivers on its own."""
    try:
        settle()
    except Exception as exc:
        log.warning("could not settle a delivery (%s); the broker will redeliver it", one_line(exc))
        log.debug("settling failed", exc_info=True)
