"""Scheduled handlers: a function a consumer runs every ``every``, once per tick across
all its replicas.

    @consumer.scheduled(every=timedelta(minutes=1))
    def expire_carts(session, context: outboxer.Tick) -> None:
        ...   # session.publish(...) goes through the outbox, with this run's commit

``outboxer-inbox`` (and ``consumer.run``) runs them beside the consumer's messages. Each
tick is claimed in the database (:mod:`outboxer.store.schedule`), so N replicas run it
once. The run is the handler's transaction: what it writes and publishes commits together.
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
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.engine import Connection, Engine

from .errors import ConfigurationError
from .failures import ErrorChannel, Failure, RunChannel, default_channel
from .ids import uuid7
from .message import Envelope
from .plan import plural
from .redaction import error_text, printable, redact
from .retry import Retry, Verdict
from .runner import OUTAGE_BACKOFF, StopSignal
from .store import schedule as schedule_store

__all__ = ["DEFAULT_LEASE", "SCHEDULED_TYPE", "Scheduled", "Scheduler", "Tick", "build_scheduled"]

log = logging.getLogger("outboxer.consumer")

DEFAULT_LEASE = 60.0
"""Seconds a replica that died in a run keeps the others from running the handler (a
live replica renews its lease while the run lasts)."""

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
    if handler in taken:
        raise ConfigurationError(f"{where}: the name is taken; pass name=...")
    if consumer_is_async:
        raise ConfigurationError(
            f"{where}: scheduled handlers run on consumers with a sync session factory "
            "(sessionmaker); register it on a sync consumer"
        )
    if not callable(fn) or inspect.iscoroutinefunction(fn):
        raise ConfigurationError(f"{where}: it must be a plain function (def, not async def)")
    seconds = _seconds(every, f"{where}: every")
    if seconds <= 0:
        raise ConfigurationError(f"{where}: every must be more than 0 seconds, got {every!r}")
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
    if held <= 0:
        raise ConfigurationError(f"{where}: lease must be more than 0 seconds, got {lease!r}")
    wants = _parameters(fn, where)
    return Scheduled(consumer, handler, fn, seconds, retry, held, None, wants)


def _seconds(value: timedelta | float, what: str) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ConfigurationError(f"{what} must be a timedelta or seconds, got {value!r}")


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
        self._outages = 0

    async def keep_running(self, stop: StopSignal, *, once: bool = False) -> None:
        """Run due ticks until ``stop`` (with ``once``: those due now, then return). A
        database outage is logged and waited out; a run in progress finishes on stop."""
        while not stop.is_set():
            try:
                pause = await self._run_due_keeping_leases()
                self._outages = 0
            except Exception as exc:
                self._outages += 1
                pause = OUTAGE_BACKOFF.delay(self._outages)
                log.warning(
                    "scheduled handlers of %s: the schedule could not be read (%s); "
                    "trying again in %.1f s",
                    self.scheduled[0].consumer,
                    printable(error_text(exc), 300),
                    pause,
                    exc_info=exc if self._outages == 1 else None,
                )
            if once:
                return
            await stop.sleep(min(pause, 1.0))

    async def _run_due_keeping_leases(self) -> float:
        """:meth:`run_due` in a thread; meanwhile the leases of the runs in progress are
        renewed every third of their length, so a long run is not overlapped."""
        running = asyncio.ensure_future(asyncio.to_thread(self.run_due))
        interval = min(spec.lease for spec in self.scheduled) / 3
        while True:
            done, _ = await asyncio.wait({running}, timeout=interval)
            if done:
                return running.result()
            try:
                await asyncio.to_thread(self.renew_leases)
            except Exception:  # the run's own end meets the same trouble and reports it
                log.debug("could not renew the leases of scheduled runs", exc_info=True)

    def renew_leases(self) -> None:
        """Extend the leases this replica holds (its runs in progress)."""
        engine = self._engine_for_ticks()
        with engine.connect() as connection:
            for spec in self.scheduled:
                schedule_store.renew_lease(
                    connection, name=spec.id, owner=self.owner, lease=spec.lease
                )

    def run_due(self) -> float:
        """Run every tick that is due and not claimed elsewhere; the seconds until the
        next tick begins (on this host's clock: when to look again; the claim decides)."""
        engine = self._engine_for_ticks()
        for spec in self.scheduled:
            with engine.connect() as connection:
                tick = schedule_store.claim_tick(
                    connection, name=spec.id, every=spec.every, owner=self.owner, lease=spec.lease
                )
            if tick is None:
                continue
            try:
                self._run(spec, tick)
            finally:
                with engine.connect() as connection:
                    schedule_store.release_tick(connection, name=spec.id, owner=self.owner)
        now = self._clock()
        return min(spec.every - (now % spec.every) for spec in self.scheduled)

    def _engine_for_ticks(self) -> Engine:
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
        due_at = datetime.fromtimestamp(number * spec.every, timezone.utc)
        attempt = 1
        while True:
            tick = Tick(spec.consumer, spec.name, number, due_at, attempt)
            try:
                with self.session_factory() as session, session.begin():
                    arguments = {"session": session, "context": tick}
                    spec.fn(**{k: v for k, v in arguments.items() if k in spec.wants})
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                decision = spec.retry.decide(attempt, exc)
                if decision.verdict is Verdict.RETRY_NOW:
                    log.warning(
                        "scheduled handler %s failed on tick %d (attempt %d): %s; again now",
                        spec.id,
                        number,
                        attempt,
                        printable(error_text(exc)),
                    )
                    attempt += 1
                    continue
                self._give_up(spec, tick, redact(exc), decision.reason or "exhausted")
                return
            log.debug("scheduled handler %s ran tick %d", spec.id, number)
            return

    def _give_up(self, spec: Scheduled, tick: Tick, error: BaseException, reason: str) -> None:
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
            return
        envelope = Envelope(
            message_id=uuid7(),
            type=SCHEDULED_TYPE,
            destination=spec.consumer,
            payload=b"{}",
            occurred_at=tick.due_at,
            handler=spec.id,
            attempt=tick.attempt,
        )
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
