"""Scheduled handlers: a function a consumer runs every ``every``, once per tick across
all its replicas.

    @consumer.scheduled(every=timedelta(minutes=1))
    def expire_carts(session, context: outboxer.Tick) -> None:
        ...   # session.publish(...) goes through the outbox, with this run's commit

``outboxer-inbox`` (and ``consumer.run``) runs them beside the consumer's messages, each
scheduled handler in a loop and a thread of its own, so a slow or hung one delays no other
(and never overlaps itself). Each tick is claimed in the database
(:mod:`outboxer.store.schedule`), so N replicas run it once. The run is the handler's
transaction: what it writes and publishes commits together.
A failing run is retried at once up to its ``Retry`` (``instant`` retries only: there is
no message to send back later, so a policy with delayed retries is refused at
registration); when it gives up, its error channel runs (``on_failure``, as for message
handlers) and the failure is logged. There is no dead letter: the next tick runs as usual.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.engine import Connection, Engine

from . import instrumentation
from .callables import call_sync, is_async_callable
from .checks import MAX_DURATION, too_long
from .errors import ConfigurationError
from .failures import ErrorChannel, Failure, RunChannel, default_channel
from .ids import uuid7
from .instrumentation import HandlerOutcome, SpanHandle
from .message import Envelope
from .plan import plural
from .redaction import error_text, printable, redact
from .retry import Retry, Verdict
from .runner import OUTAGE_BACKOFF, StopSignal
from .store import schedule as schedule_store
from .tables import schedules

__all__ = [
    "DEFAULT_LEASE",
    "MIN_EVERY",
    "SCHEDULED_TYPE",
    "Scheduled",
    "Scheduler",
    "Tick",
    "build_scheduled",
]

log = logging.getLogger("outboxer.consumer")

MIN_LEASE = 0.1
"""The shortest lease of a scheduled handler's run, in seconds: the lease is renewed every
third of itself while the run lasts, a statement each time; a shorter one would renew in a
busy loop and expire before its renewal reached the database."""

MIN_EVERY = 0.001
"""The shortest period of a scheduled handler, in seconds. Each tick is claimed in the
database (a transaction) and numbered ``now // every`` from the epoch: a shorter one
gives tick numbers past a BIGINT. Ticks that pass while a run or a claim is under way
are skipped, not queued."""

DEFAULT_LEASE = 60.0
"""Seconds a replica that died in a run keeps the others from running the handler (a
live replica renews its lease while the run lasts)."""

NAME_LENGTH: int = getattr(schedules.c.name.type, "length", None) or 255
"""The most characters of a schedule's name, ``consumer:handler`` (its column's length)."""

SCHEDULED_TYPE = "outboxer.scheduled"
"""The message type an error channel sees for a scheduled run that gave up."""


@dataclass(frozen=True)
class Tick:
    """What a scheduled handler's ``context`` parameter gets."""

    consumer: str
    handler: str
    number: int
    """The tick: ``number * every`` seconds after the Unix epoch, on the database clock."""
    due_at: datetime
    attempt: int
    """1 for the first run of this tick; more for its instant retries."""


@dataclass(frozen=True)
class Scheduled:
    """A registered scheduled handler."""

    consumer: str
    name: str
    fn: Callable[..., Any]
    every: float
    retry: Retry
    lease: float
    channel: ErrorChannel | None
    wants: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.consumer}:{self.name}"


def build_scheduled(
    consumer: str,
    fn: Callable[..., Any],
    *,
    every: timedelta | float,
    name: str | None,
    retry: Retry | None,
    lease: timedelta | float | None,
    consumer_is_async: bool = False,
    taken: Collection[str] = (),
) -> Scheduled:
    """Check a scheduled handler at registration; ConfigurationError names the fix. Its
    error channel is the consumer's to resolve (``channel`` is None here); ``taken`` are
    the names of the consumer's other scheduled handlers."""
    handler = name or getattr(fn, "__name__", "scheduled")
    where = f"consumer {consumer!r}, scheduled handler {handler!r}"
    if not isinstance(handler, str) or not handler or len(handler) > 200:
        raise ConfigurationError(f"{where}: a name needs 1-200 characters")
    if len(consumer) + 1 + len(handler) > NAME_LENGTH:
        raise ConfigurationError(
            f"{where}: the schedule's name {consumer!r}:{handler!r} has "
            f"{len(consumer) + 1 + len(handler)} characters, more than the {NAME_LENGTH} "
            "characters the outboxer_schedule table holds for consumer:handler; pass a "
            f"name= of at most {NAME_LENGTH - len(consumer) - 1} characters"
        )
    if handler in taken:
        raise ConfigurationError(f"{where}: the name is taken; pass name=...")
    if consumer_is_async:
        raise ConfigurationError(
            f"{where}: scheduled handlers run on consumers with a sync session factory "
            "(sessionmaker); register it on a sync consumer"
        )
    if not callable(fn) or is_async_callable(fn):
        raise ConfigurationError(f"{where}: it must be a plain function (def, not async def)")
    seconds = _seconds(every, f"{where}: every")
    if seconds <= 0:
        raise ConfigurationError(f"{where}: every must be more than 0 seconds, got {every!r}")
    if seconds < MIN_EVERY:
        raise ConfigurationError(
            f"{where}: every must be at least {MIN_EVERY:g} seconds (a tick is a row claimed "
            f"in the database, numbered from the epoch), got {every!r}"
        )
    retry = retry if retry is not None else Retry(max_attempts=1)
    if not isinstance(retry, Retry):
        raise ConfigurationError(f"{where}: retry must be an outboxer.Retry, got {retry!r}")
    if retry.max_attempts > retry.instant + 1:
        raise ConfigurationError(
            f"{where}: Retry(max_attempts={retry.max_attempts}, instant={retry.instant}) asks "
            "for delayed retries, which a scheduled run cannot have (there is no message to "
            "send back later, and the next tick comes anyway); use "
            f"Retry(max_attempts={retry.max_attempts}, instant={retry.max_attempts - 1})"
        )
    held = DEFAULT_LEASE if lease is None else _seconds(lease, f"{where}: lease")
    if held < MIN_LEASE:
        raise ConfigurationError(
            f"{where}: lease must be at least {MIN_LEASE:g} seconds (it is renewed every "
            f"third of itself while a run lasts), got {lease!r}"
        )
    wants = _parameters(fn, where)
    return Scheduled(consumer, handler, fn, seconds, retry, held, None, wants)


def _seconds(value: timedelta | float, what: str) -> float:
    """``value`` in seconds: finite, and at most :data:`~outboxer.checks.MAX_DURATION`."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    else:
        raise ConfigurationError(f"{what} must be a timedelta or seconds, got {value!r}")
    if seconds > MAX_DURATION:
        raise ConfigurationError(too_long(what, value))
    return seconds


def _parameters(fn: Callable[..., Any], where: str) -> frozenset[str]:
    wants = set()
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("session", "context"):
            wants.add(p.name)
        elif p.default is inspect.Parameter.empty and p.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            raise ConfigurationError(
                f"{where}: parameter {p.name!r} cannot be supplied; a scheduled handler "
                "takes session= and context= (an outboxer.Tick), both optional"
            )
    return frozenset(wants)


class Scheduler:
    """Claims and runs the due ticks of a consumer's scheduled handlers."""

    def __init__(
        self,
        scheduled: list[Scheduled],
        session_factory: Callable[[], Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scheduled = list(scheduled)
        self.session_factory = session_factory
        self.owner = uuid.uuid4().hex[:16]
        """This replica's name in the schedule's leases."""
        self._clock = clock
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    async def keep_running(self, stop: StopSignal, *, once: bool = False) -> None:
        """Run due ticks until ``stop`` (with ``once``: those due now, then return). Each
        scheduled handler has its own loop and thread: a slow or hung run delays only the
        next ticks of its own handler. A database outage is logged and waited out; the
        runs in progress finish on stop."""
        # Two threads a handler: its run, and the renewal of its lease meanwhile.
        threads = ThreadPoolExecutor(
            max_workers=2 * len(self.scheduled), thread_name_prefix="outboxer-scheduled"
        )
        try:
            await asyncio.gather(
                *(self._keep_running_one(spec, stop, threads, once) for spec in self.scheduled)
            )
        finally:
            threads.shutdown(wait=False)  # each loop waited for its own runs

    async def _keep_running_one(
        self, spec: Scheduled, stop: StopSignal, threads: ThreadPoolExecutor, once: bool
    ) -> None:
        outages = 0
        while not stop.is_set():
            try:
                pause = await self._run_due_keeping_lease(spec, threads)
                outages = 0
            except Exception as exc:
                outages += 1
                pause = OUTAGE_BACKOFF.delay(outages)
                log.warning(
                    "scheduled handler %s: the schedule could not be read (%s); "
                    "trying again in %.1f s",
                    spec.id,
                    printable(error_text(exc), 300),
                    pause,
                )
                if outages == 1:  # the traceback once per outage, at debug level
                    log.debug("reading the schedule failed", exc_info=exc)
            if once:
                return
            await stop.sleep(min(pause, 1.0))

    async def _run_due_keeping_lease(self, spec: Scheduled, threads: ThreadPoolExecutor) -> float:
        """:meth:`run_due_one` in a thread; meanwhile the lease of its run is renewed
        every third of its length, so a long run is not overlapped."""
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(threads, self.run_due_one, spec)
        while True:
            done, _ = await asyncio.wait({running}, timeout=spec.lease / 3)
            if done:
                return running.result()
            try:
                await loop.run_in_executor(threads, self._renew_lease, spec)
            except Exception:  # the run's own end meets the same trouble and reports it
                log.debug("could not renew the lease of %s", spec.id, exc_info=True)

    def renew_leases(self) -> None:
        """Extend the leases this replica holds (its runs in progress)."""
        for spec in self.scheduled:
            self._renew_lease(spec)

    def _renew_lease(self, spec: Scheduled) -> None:
        with self._engine_for_ticks().connect() as connection:
            schedule_store.renew_lease(connection, name=spec.id, owner=self.owner, lease=spec.lease)

    def run_due(self) -> float:
        """Run every tick that is due and not claimed elsewhere, one handler after the
        other; the seconds until the next tick begins (on this host's clock: when to look
        again; the claim decides)."""
        return min(self.run_due_one(spec) for spec in self.scheduled)

    def run_due_one(self, spec: Scheduled) -> float:
        """Run the tick of ``spec`` if it is due and not claimed elsewhere; the seconds
        until its next tick begins."""
        engine = self._engine_for_ticks()
        with engine.connect() as connection:
            tick = schedule_store.claim_tick(
                connection, name=spec.id, every=spec.every, owner=self.owner, lease=spec.lease
            )
        if tick is not None:
            try:
                self._run(spec, tick)
            finally:
                with engine.connect() as connection:
                    schedule_store.release_tick(connection, name=spec.id, owner=self.owner)
        return spec.every - (self._clock() % spec.every)

    def _engine_for_ticks(self) -> Engine:
        with self._engine_lock:  # the handlers' threads ask at once
            if self._engine is None:
                with self.session_factory() as session:
                    bind = session.get_bind()
                engine: Engine = bind.engine if isinstance(bind, Connection) else bind
                with engine.connect() as connection:
                    for spec in self.scheduled:
                        schedule_store.ensure_schedule(connection, spec.id)
                self._engine = engine
            return self._engine

    def _run(self, spec: Scheduled, number: int) -> None:
        """Run the tick, with its instant retries. Each run is a handler span (a trace of
        its own) and an ``outboxer.handler.duration`` point, as a message handler's run is;
        the error channel of a run that gives up works inside its span."""
        due_at = datetime.fromtimestamp(number * spec.every, timezone.utc)
        envelope = Envelope(
            message_id=uuid7(),
            type=SCHEDULED_TYPE,
            destination=spec.consumer,
            payload=b"{}",
            occurred_at=due_at,
            handler=spec.id,
        )
        tracer = instrumentation.get()
        attempt = 1
        while True:
            tick = Tick(spec.consumer, spec.name, number, due_at, attempt)
            started = time.perf_counter()
            with tracer.handler(envelope, spec.id, attempt) as span:
                span.set_attribute("outboxer.scheduled.tick", number)
                outcome, again = self._run_once(spec, tick, envelope, span)
                span.set_attribute("outboxer.handler.outcome", outcome)
            tracer.handler_done(spec.id, outcome, time.perf_counter() - started)
            if not again:
                return
            attempt += 1

    def _run_once(
        self, spec: Scheduled, tick: Tick, envelope: Envelope, span: SpanHandle
    ) -> tuple[str, bool]:
        """One run: its outcome, and whether to run the tick again now."""
        try:
            with self.session_factory() as session, session.begin():
                arguments = {"session": session, "context": tick}
                wanted = {k: v for k, v in arguments.items() if k in spec.wants}
                call_sync(spec.fn, f"scheduled handler {spec.name!r}", **wanted)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            span.record_error(redact(exc))
            decision = spec.retry.decide(tick.attempt, exc)
            if decision.verdict is Verdict.RETRY_NOW:
                log.warning(
                    "scheduled handler %s failed on tick %d (attempt %d): %s; again now",
                    spec.id,
                    tick.number,
                    tick.attempt,
                    printable(error_text(exc)),
                )
                return HandlerOutcome.FAILED, True
            return self._give_up(spec, tick, envelope, exc, decision.reason or "exhausted"), False
        log.debug("scheduled handler %s ran tick %d", spec.id, tick.number)
        return HandlerOutcome.PROCESSED, False

    def _give_up(
        self, spec: Scheduled, tick: Tick, envelope: Envelope, error: BaseException, reason: str
    ) -> str:
        """Log the give-up and run the error channel; the run's outcome."""
        log.error(
            "scheduled handler %s gave up on tick %d after %s (%s): %s: %s",
            spec.id,
            tick.number,
            plural(tick.attempt, "attempt"),
            reason,
            type(error).__name__,
            printable(error_text(error)),
        )
        channel = spec.channel or default_channel()
        if channel is None:
            return HandlerOutcome.FAILED
        envelope = replace(envelope, attempt=tick.attempt)
        failure = Failure(tick, envelope, error, tick.attempt, spec.consumer, spec.name, reason)
        result = RunChannel(channel, failure, lambda _connection: None).run_sync(
            self.session_factory
        )
        if result.error is not None:
            log.error(
                "error channel %s of scheduled handler %s raised: %s",
                channel.name,
                spec.id,
                printable(error_text(result.error)),
            )
        return HandlerOutcome.ERROR_CHANNEL
