"""The relay: publishes outbox rows to the broker, in order per key, at least once.

Each batch is claimed (a short transaction that leases rows), sent outside any
transaction, then settled in another short transaction: sent rows are deleted (or kept
for ``retention``), failed ones retried with backoff on the database clock, hopeless ones
moved to the dead-letter table. A broker outage opens a circuit breaker: rows are handed
back without counting attempts until the broker answers.

``run()`` pipelines: one database thread claims the next batch and settles the previous
one while the broker works, and a batch goes on the wire while the broker is still
confirming the one before. :mod:`outboxer.relay.pipeline` states the ordering rule that
makes this safe; :mod:`outboxer.relay.decide` decides each row's fate;
:mod:`outboxer.relay.liveness` lets a relay take over a dead relay's rows at once.

``Relay(engine, transport).run()`` loops until :meth:`Relay.stop` (safe from another
thread or a signal handler); ``run(once=True)`` sends what is due, then returns.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine, make_url

from .. import instrumentation
from ..errors import ConfigurationError, OutboxerError
from ..retry import Backoff, CircuitBreaker
from ..store import claims, settle
from ..store import relay as relay_store
from ..store.dead_letters import count_dead_letters
from ..store.leases import LeaseScope, token
from ..transports.base import Transport
from ..waiter import Waiter, make_waiter
from .decide import DEFAULT_BACKOFF, Decisions, SendPolicy, decide
from .liveness import Liveness
from .pipeline import Batch, Landed, Pipeline
from .reports import BatchReport, RelayStats

__all__ = ["DATABASE_BACKOFF", "Relay", "relay_engine"]

log = logging.getLogger("outboxer.relay")

T = TypeVar("T")

DATABASE_BACKOFF = Backoff(initial=0.2, multiplier=2.0, max_delay=30.0, jitter=0.2)
"""Pauses while the database is unreachable: 0.2 s doubling to 30 s (jitter included)."""

LIVENESS_INTERVAL = 1.0
"""How often a relay checks its own lock and looks for dead relays."""


class Relay:
    """Publishes outbox rows through ``transport``.

    ``batch_size`` rows per claim; ``max_attempts`` sends before a row is dead-lettered (a
    broker outage does not count; an unroutable message gets ``unroutable_attempts``);
    ``backoff`` spaces retries; ``lease`` is how long a claim stays exclusive while this
    relay lives (a relay that dies frees its rows at once, see docs/relay.md);
    ``poll_interval`` is the idle polling period (jittered) when no PostgreSQL notification
    arrives; ``retention`` keeps sent rows that many seconds instead of deleting them at
    once; ``destinations`` limits the relay to rows for those destinations (a consumer's
    own relay for its retries and replays).
    """

    def __init__(
        self,
        engine: Engine,
        transport: Transport,
        *,
        batch_size: int = 1000,
        max_attempts: int = 10,
        backoff: Backoff = DEFAULT_BACKOFF,
        lease: float = 60.0,
        poll_interval: float = 1.0,
        retention: float | None = None,
        listen: bool = True,
        name: str | None = None,
        prune_interval: float = 60.0,
        destinations: Sequence[str] | None = None,
        unroutable_attempts: int = 5,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        _require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        _require(max_attempts >= 1, f"max_attempts must be >= 1, got {max_attempts}")
        _require(
            unroutable_attempts >= 1, f"unroutable_attempts must be >= 1, got {unroutable_attempts}"
        )
        _require(lease > 0 and poll_interval > 0, "lease and poll_interval must be > 0 seconds")
        _require(
            retention is None or retention >= 0, f"retention must be >= 0 seconds, got {retention}"
        )
        _require(
            destinations is None or (bool(destinations) and not isinstance(destinations, str)),
            f"destinations must be a non-empty list of names, got {destinations!r}",
        )
        self.engine = engine
        self.transport = transport
        self.batch_size = batch_size
        self.policy = SendPolicy(max_attempts, backoff, unroutable_attempts)
        self.lease = lease
        self.poll_interval = poll_interval
        self.retention = retention
        self.listen = listen
        self.prune_interval = prune_interval
        self.destinations = list(destinations) if destinations is not None else None
        self.name = (name or f"{socket.gethostname()}:{os.getpid()}")[:255]
        self.liveness = Liveness(engine, self.name, lease)
        self.stats = RelayStats()
        self.breaker = CircuitBreaker()
        self._clock = clock
        self._rand = rand
        self._stop = threading.Event()
        self._waiter: Waiter | None = None
        self._last_prune = float("-inf")
        self._observing = False

    @property
    def max_attempts(self) -> int:
        return self.policy.max_attempts

    @property
    def backoff(self) -> Backoff:
        return self.policy.backoff

    # The loop ------------------------------------------------------------------------

    def run(self, once: bool = False) -> RelayStats:
        """Send batches until :meth:`stop`; with ``once``, send what is due and return.

        Returns the totals of this run (``relay.stats`` keeps the relay's lifetime totals).
        In ``once`` mode a broker outage ends the run (the rows stay pending) instead of
        waiting for the broker to come back, and a database error is raised. Missing
        outboxer tables raise :class:`~outboxer.errors.OutboxerError` in both modes.
        """
        self._stop.clear()
        self._observe_backlog()
        waiter = None if once else make_waiter(self.engine, listen=self.listen)
        self._waiter = waiter
        try:
            return _Run(self, once, waiter).loop()
        finally:
            self._waiter = None
            if waiter is not None:
                waiter.close()

    def stop(self) -> None:
        """Finish the batches in flight, then make :meth:`run` return. Thread- and signal-safe."""
        self._stop.set()
        waiter = self._waiter
        if waiter is not None:
            waiter.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def figures(self) -> dict[str, Any]:
        """Backlog figures for metrics and status: pending, due, oldest due age, dead letters."""
        with self.connect() as connection:
            backlog = relay_store.backlog(connection)
            with connection.begin():
                dead = count_dead_letters(connection)
        return {
            "pending": backlog.pending,
            "due": backlog.due,
            "oldest_due_seconds": backlog.oldest_due_seconds,
            "dead_letters": dead,
        }

    def connect(self) -> Connection:
        connection = self.engine.connect()
        if connection.dialect.name in ("mysql", "mariadb"):
            # Fewer gap locks between concurrent claims and producers' inserts.
            connection = connection.execution_options(isolation_level="READ COMMITTED")
        return connection

    def _observe_backlog(self) -> None:
        """Let the metrics exporter read backlog figures (only when it asks)."""
        if not self._observing:
            self._observing = True
            instrumentation.get().observe_outbox(self.figures)


class _Run:
    """One ``Relay.run()``: the database thread, the pipeline, and the batches between."""

    def __init__(self, relay: Relay, once: bool, waiter: Waiter | None) -> None:
        self.relay = relay
        self.once = once
        self.waiter = waiter
        self.db = _DatabaseThread()
        self.pipeline = Pipeline(relay.transport)
        self.prefetch: Future[Batch] | None = None
        self.settling: deque[Future[BatchReport]] = deque()
        self.totals = RelayStats()
        self.outage = _Outage(relay._rand)
        self.next_check = float("-inf")
        self.batches = 0

    def loop(self) -> RelayStats:
        relay = self.relay
        try:
            self._start()
            while not relay._stop.is_set():
                self._collect(block=False)
                self._check_liveness()
                pause = relay.breaker.remaining(relay._clock())
                if pause > 0:
                    self._drain()
                    if self.once:
                        break
                    self._wait(pause)
                    continue
                batch = self._next_batch()
                if batch is None:
                    continue
                while self.pipeline.oldest_done():
                    self._land()  # results already in: their holds apply to this batch
                batch = self._hold_back(batch)
                if not batch.rows:
                    if len(self.pipeline):
                        self._land()
                        continue
                    self._collect(block=True)
                    if self.once:
                        break
                    self._idle()
                    continue
                self.pipeline.send(batch)
                if not relay.breaker.is_open:  # while probing a broker, one batch at a time
                    self._prefetch()
                while len(self.pipeline) >= (1 if relay.breaker.is_open else 2):
                    self._land()
        finally:
            self._shut_down()
        return self.totals

    # Steps -----------------------------------------------------------------------------

    def _start(self) -> None:
        """Check the tables, register, take the liveness lock, learn who is dead."""
        while not self.relay._stop.is_set():
            try:
                self.db.call(self.relay.liveness.check)
            except Exception as exc:
                self._database_trouble(exc)
                continue
            self.outage.recovered()
            self.next_check = self.relay._clock() + LIVENESS_INTERVAL
            return

    def _check_liveness(self) -> None:
        now = self.relay._clock()
        if now >= self.next_check:
            self.next_check = now + LIVENESS_INTERVAL
            self.db.submit(self._liveness_check)

    def _liveness_check(self, _seq: int) -> None:
        try:
            self.relay.liveness.check()
        except Exception:  # the next claim meets the same trouble and reports it
            log.debug("the liveness check failed", exc_info=True)

    def _prefetch(self) -> None:
        self.batches += 1
        number = self.batches
        tokens = self.pipeline.tokens()
        self.prefetch = self.db.submit(lambda seq: self._claim(number, tokens, seq))

    def _claim(self, number: int, in_flight: list[str], seq: int) -> Batch:
        relay = self.relay
        owner = token(relay.liveness.relay_id, number)
        scope = LeaseScope(
            relay=relay.liveness.relay_id,
            in_flight=in_flight,
            dead=relay.liveness.dead,
            destinations=relay.destinations,
        )
        started = time.perf_counter()
        with relay.connect() as connection:
            rows = claims.claim_batch(
                connection,
                owner=owner,
                scope=scope,
                limit=relay.batch_size,
                lease_seconds=relay.lease,
            )
        return Batch(rows, owner, time.perf_counter() - started, seq)

    def _next_batch(self) -> Batch | None:
        if self.prefetch is None:
            self._prefetch()
        assert self.prefetch is not None
        pending, self.prefetch = self.prefetch, None
        try:
            batch = pending.result()
        except Exception as exc:
            self._database_trouble(exc)
            return None
        self.outage.recovered()
        return batch

    def _hold_back(self, batch: Batch) -> Batch:
        held = self.pipeline.held_rows(batch)
        if not held:
            return batch
        self.db.submit(lambda _seq: self._release(batch.token, held))
        ids = set(held)
        return replace(batch, rows=[row for row in batch.rows if row.id not in ids])

    def _land(self) -> None:
        """Take the oldest batch off the wire, decide, and settle it (database thread)."""
        relay = self.relay
        landed = self.pipeline.land()
        decisions = decide(landed.batch.rows, landed.results, relay.policy, relay._rand)
        report = BatchReport(
            claimed=len(landed.batch.rows),
            sent=len(decisions.sent),
            retried=len(decisions.retry),
            dead_lettered=len(decisions.dead),
            released=len(decisions.release),
            unavailable=decisions.unavailable is not None,
            claim_seconds=landed.batch.claim_seconds,
            send_seconds=landed.send_seconds,
        )
        self._breaker(decisions)
        decisions.dead = [_with_dead_letter_span(d) for d in decisions.dead]
        seq, settled = self.db.submit_seq(lambda _s: self._settle(landed, decisions, report))
        self.pipeline.hold(decisions.held_keys, seq)
        self.settling.append(settled)
        if decisions.unavailable is not None and self.prefetch is not None:
            self._discard_prefetch()

    def _breaker(self, decisions: Decisions) -> None:
        relay = self.relay
        if decisions.unavailable is not None:
            pause = relay.breaker.record_unavailable(relay._clock(), relay._rand)
            log.warning(
                "broker unavailable (%s); %s handed back, next try in %.1f s",
                decisions.unavailable.error,
                _count(len(decisions.release), "message"),
                pause,
            )
        elif decisions.sent:
            if relay.breaker.is_open:
                log.info("broker is reachable again")
            relay.breaker.record_success()

    def _settle(self, landed: Landed, decisions: Decisions, report: BatchReport) -> BatchReport:
        relay = self.relay
        started = time.perf_counter()
        with relay.connect() as connection:
            settle.settle(
                connection,
                owner=landed.batch.token,
                sent=decisions.sent,
                retry=decisions.retry,
                dead=decisions.dead,
                release_ids=decisions.release,
                keep_sent=relay.retention is not None,
            )
        report.settle_seconds = time.perf_counter() - started
        for dead in decisions.dead:
            envelope = dead.claimed.envelope
            log.warning(
                "message %s (%s to %r) dead-lettered after %s: %s: %s",
                envelope.message_id,
                envelope.type,
                envelope.destination,
                _count(dead.attempts, "attempt"),
                dead.error_type,
                dead.error,
            )
        if decisions.unroutable_retries:
            log.warning(
                "%s could not be routed (no queue is bound for it yet: start its consumer); "
                "retrying with backoff before dead-lettering",
                _count(decisions.unroutable_retries, "message"),
            )
        relay.stats.add(report)
        instrumentation.get().relay_batch(
            sent=report.sent,
            retried=report.retried,
            dead_lettered=report.dead_lettered,
            duration=report.seconds,
        )
        log.info("%s", report.line())
        return report

    def _release(self, owner: str, ids: list[int]) -> None:
        try:
            with self.relay.connect() as connection:
                settle.release(connection, owner=owner, ids=ids)
        except Exception:  # the rows stay leased by this relay and count as free for it
            log.debug("could not hand back %d rows", len(ids), exc_info=True)

    def _discard_prefetch(self) -> None:
        """Hand back a claimed batch that will not be sent."""
        pending, self.prefetch = self.prefetch, None
        if pending is None:
            return
        try:
            batch = pending.result()
        except Exception:
            log.debug("the discarded claim had failed", exc_info=True)
            return
        if batch.rows:
            ids = [row.id for row in batch.rows]
            self.db.submit(lambda _seq: self._release(batch.token, ids))

    def _drain(self) -> None:
        """Land everything on the wire and hand back the claimed batch (broker down)."""
        while len(self.pipeline):
            self._land()
        self._discard_prefetch()

    def _collect(self, block: bool) -> None:
        """Add finished settles to the totals; a failed one is database trouble."""
        while self.settling and (block or self.settling[0].done()):
            try:
                self.totals.add(self.settling.popleft().result())
            except Exception as exc:
                # Its rows stay leased by this relay, which sends them again (at least once).
                self._database_trouble(exc)

    def _idle(self) -> None:
        self._maintain()
        self._wait(self._idle_timeout())

    def _maintain(self) -> None:
        """Periodic housekeeping when idle: prune sent rows past retention."""
        relay = self.relay
        if relay.retention is None:
            return
        now = relay._clock()
        if now - relay._last_prune < relay.prune_interval:
            return
        relay._last_prune = now
        try:
            with relay.connect() as connection:
                while not relay._stop.is_set():
                    pruned = settle.prune_sent(connection, older_than=relay.retention)
                    if pruned:
                        log.debug("pruned %d sent rows past retention", pruned)
                    if pruned < 1000:
                        break
        except Exception:
            log.warning("pruning sent rows failed; trying again later", exc_info=True)

    def _idle_timeout(self) -> float:
        relay = self.relay
        jittered = relay.poll_interval * (0.8 + 0.4 * relay._rand())
        try:
            with relay.connect() as connection:
                due = relay_store.next_due_in(connection)
        except Exception:  # the database may be restarting; the next claim will tell
            log.debug("could not read the next due time; polling", exc_info=True)
            return jittered
        if due is None:
            return jittered
        return max(0.0, min(jittered, due))

    def _database_trouble(self, exc: Exception) -> None:
        if _tables_missing(exc):
            raise OutboxerError(
                "the outboxer tables are missing: run `outboxer db upgrade --db URL` "
                f"({_one_line(exc)})"
            ) from exc
        if self.once:
            raise exc
        self._wait(self.outage.failed(exc, self.relay.name))

    def _wait(self, timeout: float) -> None:
        if self.waiter is None:
            self.relay._stop.wait(timeout)
        else:
            self.waiter.wait(timeout, self.relay._stop)

    def _shut_down(self) -> None:
        try:
            while len(self.pipeline):
                self._land()
            self._discard_prefetch()
            self._collect(block=True)
        except Exception:
            log.warning("settling the batches in flight failed", exc_info=True)
        finally:
            try:
                self.db.call(self.relay.liveness.stop)
            except Exception:
                log.debug("could not deregister", exc_info=True)
            self.db.shutdown()


class _DatabaseThread:
    """One worker thread for the relay's database work, in submission order.

    Every task gets a sequence number and is called with it: tasks run in that order, so a
    claim submitted after a settle sees what the settle wrote.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="outboxer-relay-db")
        self._seq = 0

    def submit_seq(self, fn: Callable[[int], T]) -> tuple[int, Future[T]]:
        self._seq += 1
        return self._seq, self._pool.submit(fn, self._seq)

    def submit(self, fn: Callable[[int], T]) -> Future[T]:
        return self.submit_seq(fn)[1]

    def call(self, fn: Callable[[], T]) -> T:
        return self.submit(lambda _seq: fn()).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class _Outage:
    """Database trouble: the pause before each retry, and one log line per retry."""

    def __init__(self, rand: Callable[[], float]) -> None:
        self._rand = rand
        self.failures = 0
        self._since = 0.0

    def failed(self, exc: BaseException, relay: str) -> float:
        self.failures += 1
        pause = DATABASE_BACKOFF.delay(self.failures, self._rand)
        if self.failures == 1:
            self._since = time.monotonic()
            log.debug("relay %s: the database failed", relay, exc_info=exc)
        log.warning(
            "relay %s: database trouble (%s); trying again in %.1f s",
            relay,
            _one_line(exc),
            pause,
        )
        return pause

    def recovered(self) -> None:
        if self.failures:
            log.info(
                "the database is reachable again (after %s in %.1f s)",
                _count(self.failures, "failed attempt"),
                time.monotonic() - self._since,
            )
            self.failures = 0


def _with_dead_letter_span(dead: relay_store.DeadLetterRow) -> relay_store.DeadLetterRow:
    attributes = {"outboxer.dead_letter.origin": "relay", "error.type": dead.error_type}
    with instrumentation.get().step("dead_letter", dead.claimed.envelope, attributes) as span:
        return replace(dead, trace=span.trace_headers())


def _tables_missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "outboxer_" in text and (
        "does not exist" in text or "doesn't exist" in text or "no such table" in text
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def relay_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for a relay process: on PostgreSQL its commits do not wait for the disk.

    The relay's own writes (leases, deletes of sent rows, retry times, dead-letter moves)
    need not survive a database crash: losing the last of them only makes the relay send
    those messages again, which the inbox absorbs. ``synchronous_commit=off`` saves a
    disk flush per claim and per settle. Set on the relay's own connections only, never
    on an application's.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg":
        connect_args = dict(kwargs.pop("connect_args", {}))
        options = connect_args.get("options", "")
        connect_args["options"] = f"{options} -c synchronous_commit=off".strip()
        kwargs["connect_args"] = connect_args
    return create_engine(parsed, **kwargs)
