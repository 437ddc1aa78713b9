"""The relay: publishes outbox rows to the broker, in order per key, at least once.

Each batch is claimed (a short transaction that leases rows), sent outside any
transaction, then settled in another short transaction: sent rows are deleted (or kept
for ``retention``), failed ones retried with backoff on the database clock, hopeless
ones moved to the dead-letter table. A broker outage opens a circuit breaker: rows are
handed back without counting attempts until the broker answers.

``run()`` pipelines: one database thread claims the next batch and settles the previous
one while the broker works, and a batch is put on the wire while the broker is still
confirming the one before (RabbitMQ spends most of a batch's time persisting and
confirming). A batch may hold later rows of keys still being sent (the claim treats this
relay's rows in flight as its own); batches go out strictly one after another, and when a
message of a key fails transiently, the rows of that key claimed since are handed back
unsent. The one exception: the batch already on the wire behind a failed message may
carry later messages of its key (see docs/guarantees.md).

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
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine, make_url

from . import instrumentation
from .instrumentation import SpanHandle
from .retry import Backoff, CircuitBreaker
from .store import relay as relay_store
from .store.dead_letters import count_dead_letters
from .store.relay import Claimed, DeadLetterRow, RetryRow
from .transports.base import Outcome, SendResult, Transport
from .waiter import Waiter, make_waiter

__all__ = ["BatchReport", "Relay", "RelayStats", "relay_engine"]

log = logging.getLogger("outboxer.relay")

DEFAULT_BACKOFF = Backoff(initial=1.0, multiplier=2.0, max_delay=300.0, jitter=0.2)


@dataclass
class BatchReport:
    """What one claim-send-settle iteration did."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    unavailable: bool = False
    claim_seconds: float = 0.0
    send_seconds: float = 0.0
    settle_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.claim_seconds + self.send_seconds + self.settle_seconds


@dataclass
class RelayStats:
    """Totals since the relay started (``relay.stats``) or of one ``run()``."""

    batches: int = 0
    sent: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    outages: int = 0
    last: BatchReport = field(default_factory=BatchReport)

    def add(self, report: BatchReport) -> None:
        if report.claimed:
            self.batches += 1
        self.sent += report.sent
        self.retried += report.retried
        self.dead_lettered += report.dead_lettered
        self.released += report.released
        self.outages += int(report.unavailable)
        self.last = report


@dataclass
class _Batch:
    """Rows claimed under one owner token, and how long the claim took."""

    rows: list[Claimed]
    owner: str
    claim_seconds: float = 0.0


@dataclass
class _Sending:
    """A batch on the wire: one pending transport send (and span) per destination."""

    batch: _Batch
    started: float
    groups: list[tuple[str, list[int], Future[list[SendResult]], SpanHandle]] = field(
        default_factory=list
    )
    spans: ExitStack = field(default_factory=ExitStack)


@dataclass
class _Settlement:
    """What to write for a sent batch, decided on the main thread."""

    batch: _Batch
    report: BatchReport
    sent: list[int] = field(default_factory=list)
    retry: list[RetryRow] = field(default_factory=list)
    dead: list[DeadLetterRow] = field(default_factory=list)
    release: list[int] = field(default_factory=list)

    @property
    def retry_ids(self) -> list[int]:
        return [row.id for row in self.retry]


class Relay:
    """Publishes outbox rows through ``transport``.

    ``batch_size`` rows per claim; ``max_attempts`` sends before a row is dead-lettered
    (a broker outage does not count); ``backoff`` spaces retries; ``lease`` is how long a
    claim stays exclusive (a relay that dies releases its rows when its leases expire);
    ``poll_interval`` is the idle polling period (jittered) when no PostgreSQL
    notification arrives; ``retention`` keeps sent rows that many seconds instead of
    deleting them at once.
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
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if lease <= 0 or poll_interval <= 0:
            raise ValueError("lease and poll_interval must be > 0 seconds")
        if retention is not None and retention < 0:
            raise ValueError(f"retention must be >= 0 seconds, got {retention}")
        self.engine = engine
        self.transport = transport
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.lease = lease
        self.poll_interval = poll_interval
        self.retention = retention
        self.listen = listen
        self.prune_interval = prune_interval
        self.name = (name or f"{socket.gethostname()}:{os.getpid()}")[:50]
        self.owner = ""
        """The token leases are taken under; renewed when a batch leaves the pipeline
        abnormally, so stale leases never count as rows in flight."""
        self._renew_owner()
        self.stats = RelayStats()
        self.breaker = CircuitBreaker()
        self._clock = clock
        self._rand = rand
        self._stop = threading.Event()
        self._waiter: Waiter | None = None
        self._last_prune = float("-inf")
        self._observing = False
        self._db_failures = 0

    # The loop ------------------------------------------------------------------------

    def run(self, once: bool = False) -> RelayStats:
        """Send batches until :meth:`stop`; with ``once``, send what is due and return.

        Returns the totals of this run (``relay.stats`` keeps the relay's lifetime totals).
        In ``once`` mode a broker outage ends the run (the rows stay pending) instead of
        waiting for the broker to come back, and a database error is raised.
        """
        self._stop.clear()
        self._observe_backlog()
        run_stats = RelayStats()
        waiter = None if once else make_waiter(self.engine, listen=self.listen)
        self._waiter = waiter
        db = ThreadPoolExecutor(1, thread_name_prefix="outboxer-relay-db")
        prefetch: Future[_Batch] | None = None
        settling: Future[BatchReport] | None = None
        on_wire: _Sending | None = None
        blocked: set[str] = set()
        try:
            while not self._stop.is_set():
                if self.breaker.remaining(self._clock()) > 0:
                    self._discard(prefetch)
                    prefetch = None
                    if once:
                        break
                    self._wait(waiter, self.breaker.remaining(self._clock()))
                    continue
                try:
                    batch = prefetch.result() if prefetch is not None else self._claim()
                    prefetch = None
                    if blocked:
                        batch = self._hold_back(batch, blocked)
                        blocked = set()
                except Exception:
                    prefetch = None
                    if once:
                        raise
                    self._database_trouble(waiter)
                    continue
                self._db_failures = 0
                if not batch.rows:
                    if on_wire is not None:
                        # Finish what is on the wire before deciding there is nothing to do.
                        settlement = self._receive(on_wire)
                        on_wire = None
                        blocked = self._keys_to_hold(settlement)
                        self._collect(settling, run_stats, waiter)
                        settling = db.submit(self._settle, settlement)
                        continue
                    self._collect(settling, run_stats, waiter)
                    settling = None
                    if once:
                        break
                    self._maintain()
                    self._wait(waiter, self._idle_timeout())
                    continue
                # Claim the next batch, and put this one on the wire while the broker is
                # still confirming the previous one.
                prefetch = db.submit(self._claim)
                sending = self._start_send(batch)
                if on_wire is not None:
                    settlement = self._receive(on_wire)
                    blocked = self._keys_to_hold(settlement)
                    self._collect(settling, run_stats, waiter)
                    settling = db.submit(self._settle, settlement)
                    if settlement.report.unavailable:
                        self._discard(prefetch)
                        prefetch = None
                on_wire = sending
                if once and self.breaker.is_open:
                    settlement = self._receive(on_wire)
                    on_wire = None
                    self._collect(settling, run_stats, waiter)
                    settling = db.submit(self._settle, settlement)
                    break
        finally:
            if on_wire is not None:
                try:
                    self._collect(settling, run_stats, waiter, final=True)
                    settling = db.submit(self._settle, self._receive(on_wire))
                except Exception:
                    log.warning("settling the batch in flight failed", exc_info=True)
            self._discard(prefetch)
            self._collect(settling, run_stats, waiter, final=True)
            db.shutdown(wait=True)
            self._waiter = None
            if waiter is not None:
                waiter.close()
        return run_stats

    def run_once(self) -> BatchReport:
        """Claim one batch, send it, settle the results (no pipelining)."""
        batch = self._claim()
        if not batch.rows:
            return BatchReport(claim_seconds=batch.claim_seconds)
        return self._settle(self._receive(self._start_send(batch)))

    def stop(self) -> None:
        """Finish the batch in flight, then make :meth:`run` return. Thread- and signal-safe."""
        self._stop.set()
        waiter = self._waiter
        if waiter is not None:
            waiter.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def figures(self) -> dict[str, Any]:
        """Backlog figures for metrics and status: pending, due, oldest due age, dead letters."""
        with self._connect() as connection:
            backlog = relay_store.backlog(connection)
            with connection.begin():
                dead = count_dead_letters(connection)
        return {
            "pending": backlog.pending,
            "due": backlog.due,
            "oldest_due_seconds": backlog.oldest_due_seconds,
            "dead_letters": dead,
        }

    # Steps -----------------------------------------------------------------------------

    def _claim(self) -> _Batch:
        owner = self.owner
        started = time.perf_counter()
        with self._connect() as connection:
            rows = relay_store.claim_batch(
                connection, owner=owner, limit=self.batch_size, lease_seconds=self.lease
            )
        return _Batch(rows, owner, time.perf_counter() - started)

    def _start_send(self, batch: _Batch) -> _Sending:
        """Hand ``batch`` to the transport, one send per destination (each with its span)."""
        sending = _Sending(batch, time.perf_counter())
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(batch.rows):
            groups.setdefault(item.envelope.destination, []).append(index)
        tracer = instrumentation.get()
        for destination, indexes in groups.items():
            envelopes = [batch.rows[i].envelope for i in indexes]
            span = sending.spans.enter_context(
                tracer.send(self.transport.description, destination, envelopes)
            )
            try:
                pending = self.transport.send_async(envelopes)
            except Exception as exc:  # a transport bug or outage must not kill the relay
                pending = Future()
                pending.set_exception(exc)
            sending.groups.append((destination, indexes, pending, span))
        return sending

    def _receive(self, sending: _Sending) -> _Settlement:
        """Wait for the transport's results and decide what to write."""
        results: list[SendResult | None] = [None] * len(sending.batch.rows)
        try:
            for destination, indexes, pending, span in sending.groups:
                try:
                    group_results = pending.result()
                    if len(group_results) != len(indexes):
                        raise RuntimeError(
                            f"{type(self.transport).__name__} returned {len(group_results)} "
                            f"results for {len(indexes)} messages"
                        )
                except Exception as exc:
                    log.exception("sending to %r failed", destination)
                    span.record_error(exc)
                    reason = f"{type(exc).__name__}: {exc}"
                    group_results = [SendResult.unavailable(type(exc).__name__, reason)] * len(
                        indexes
                    )
                failures = [r for r in group_results if r.outcome is not Outcome.SENT]
                if failures:
                    span.set_attribute("error.type", failures[0].error_type or "error")
                for i, result in zip(indexes, group_results, strict=True):
                    results[i] = result
        finally:
            sending.spans.close()
        done = [r for r in results if r is not None]
        return self._decide(sending.batch, done, time.perf_counter() - sending.started)

    def _decide(self, batch: _Batch, results: list[SendResult], seconds: float) -> _Settlement:
        """Turn send results into rows to delete, retry, dead-letter or release."""
        tracer = instrumentation.get()
        report = BatchReport(
            claimed=len(batch.rows), claim_seconds=batch.claim_seconds, send_seconds=seconds
        )
        settlement = _Settlement(batch, report)
        for item, result in zip(batch.rows, results, strict=True):
            outcome = result.outcome
            if outcome is Outcome.SENT:
                settlement.sent.append(item.id)
            elif outcome is Outcome.UNAVAILABLE:
                settlement.release.append(item.id)
            else:
                attempts = item.attempts + 1
                error = result.error or result.error_type or "send failed"
                if outcome is Outcome.REJECTED or attempts >= self.max_attempts:
                    if outcome is Outcome.RETRY:
                        error = f"gave up after {attempts} attempts; last error: {error}"
                    error_type = result.error_type or "error"
                    attributes = {"outboxer.dead_letter.origin": "relay", "error.type": error_type}
                    with tracer.step("dead_letter", item.envelope, attributes) as span:
                        trace = span.trace_headers()
                    settlement.dead.append(DeadLetterRow(item, error_type, error, attempts, trace))
                else:
                    delay = self.backoff.delay(attempts, self._rand)
                    settlement.retry.append(
                        RetryRow(item.id, delay, f"{result.error_type}: {error}")
                    )
        if settlement.release:
            report.unavailable = True
            pause = self.breaker.record_unavailable(self._clock(), self._rand)
            log.warning(
                "broker unavailable (%s); %d messages handed back, next try in %.1f s",
                next(r.error for r in results if r.outcome is Outcome.UNAVAILABLE),
                len(settlement.release),
                pause,
            )
        elif settlement.sent:
            if self.breaker.is_open:
                log.info("broker is reachable again")
            self.breaker.record_success()
        report.sent, report.retried = len(settlement.sent), len(settlement.retry)
        report.dead_lettered, report.released = len(settlement.dead), len(settlement.release)
        return settlement

    def _settle(self, settlement: _Settlement) -> BatchReport:
        report = settlement.report
        started = time.perf_counter()
        try:
            with self._connect() as connection:
                relay_store.settle(
                    connection,
                    owner=settlement.batch.owner,
                    sent=settlement.sent,
                    retry=settlement.retry,
                    dead=settlement.dead,
                    release_ids=settlement.release,
                    keep_sent=self.retention is not None,
                )
        except Exception:
            # These rows keep their lease and will be sent again after it expires (at
            # least once). They are no longer in flight: stop counting leases under this
            # token as ours, or the next claim could send later rows of their keys first.
            self._renew_owner()
            raise
        report.settle_seconds = time.perf_counter() - started
        for dead in settlement.dead:
            log.warning(
                "message %s (%s to %r) dead-lettered after %d attempts: %s: %s",
                dead.claimed.envelope.message_id,
                dead.claimed.envelope.type,
                dead.claimed.envelope.destination,
                dead.attempts,
                dead.error_type,
                dead.error,
            )
        self.stats.add(report)
        instrumentation.get().relay_batch(
            sent=report.sent,
            retried=report.retried,
            dead_lettered=report.dead_lettered,
            duration=report.seconds,
        )
        log.info(
            "batch: %d claimed, %d sent, %d retried, %d dead-lettered, %d released in %.1f ms "
            "(claim %.1f, send %.1f, settle %.1f)",
            report.claimed,
            report.sent,
            report.retried,
            report.dead_lettered,
            report.released,
            report.seconds * 1000,
            report.claim_seconds * 1000,
            report.send_seconds * 1000,
            report.settle_seconds * 1000,
        )
        return report

    @staticmethod
    def _keys_to_hold(settlement: _Settlement) -> set[str]:
        """Keys whose message failed transiently: their rows claimed since must wait."""
        held = set(settlement.retry_ids) | set(settlement.release)
        return {
            item.envelope.key
            for item in settlement.batch.rows
            if item.envelope.key is not None and item.id in held
        }

    def _hold_back(self, batch: _Batch, keys: set[str]) -> _Batch:
        """Hand back the rows of ``keys``: an earlier row of theirs is waiting to be retried."""
        held = [item.id for item in batch.rows if item.envelope.key in keys]
        if not held:
            return batch
        with self._connect() as connection:
            relay_store.release(connection, owner=batch.owner, ids=held)
        keep = [item for item in batch.rows if item.envelope.key not in keys]
        return _Batch(keep, batch.owner, batch.claim_seconds)

    def _discard(self, prefetch: Future[_Batch] | None) -> None:
        """Hand back a prefetched batch that will not be sent."""
        if prefetch is None:
            return
        try:
            batch = prefetch.result()
            if batch.rows:
                with self._connect() as connection:
                    relay_store.release(
                        connection, owner=batch.owner, ids=[item.id for item in batch.rows]
                    )
        except Exception:  # its leases expire on their own
            log.warning("could not hand back a prefetched batch", exc_info=True)

    def _collect(
        self,
        settling: Future[BatchReport] | None,
        totals: RelayStats,
        waiter: Waiter | None,
        final: bool = False,
    ) -> None:
        """Wait for the previous batch's settle; add it to ``totals``."""
        if settling is None:
            return
        try:
            totals.add(settling.result())
        except Exception:
            if final:
                log.warning("settling the last batch failed", exc_info=True)
            else:
                self._database_trouble(waiter)

    def _maintain(self) -> None:
        """Periodic housekeeping when idle: prune sent rows past retention."""
        if self.retention is None:
            return
        now = self._clock()
        if now - self._last_prune < self.prune_interval:
            return
        self._last_prune = now
        with self._connect() as connection:
            while not self._stop.is_set():
                pruned = relay_store.prune_sent(connection, older_than=self.retention)
                if pruned:
                    log.debug("pruned %d sent rows past retention", pruned)
                if pruned < 1000:
                    break

    def _database_trouble(self, waiter: Waiter | None) -> None:
        self._db_failures += 1
        pause = min(30.0, 0.2 * 2 ** min(self._db_failures - 1, 8)) * (0.8 + 0.4 * self._rand())
        log.warning(
            "relay %s: a batch failed (database trouble?); trying again in %.1f s",
            self.name,
            pause,
            exc_info=True,
        )
        self._wait(waiter, pause)

    def _idle_timeout(self) -> float:
        jittered = self.poll_interval * (0.8 + 0.4 * self._rand())
        try:
            with self._connect() as connection:
                due = relay_store.next_due_in(connection)
        except Exception:  # the database may be restarting; poll again later
            log.warning("could not read the next due time; polling", exc_info=True)
            return jittered
        if due is None:
            return jittered
        return max(0.0, min(jittered, due))

    def _wait(self, waiter: Waiter | None, timeout: float) -> None:
        if waiter is None:
            self._stop.wait(timeout)
        else:
            waiter.wait(timeout, self._stop)

    def _observe_backlog(self) -> None:
        """Let the metrics exporter read backlog figures (only when it asks)."""
        if self._observing:
            return
        self._observing = True
        instrumentation.get().observe_outbox(self.figures)

    def _renew_owner(self) -> None:
        self.owner = f"{self.name}:{uuid.uuid4().hex[:12]}"

    def _connect(self) -> Connection:
        connection = self.engine.connect()
        if connection.dialect.name in ("mysql", "mariadb"):
            # Fewer gap locks between concurrent claims and producers' inserts.
            connection = connection.execution_options(isolation_level="READ COMMITTED")
        return connection


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
