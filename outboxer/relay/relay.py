"""The relay: publishes outbox rows to the broker, in order per key, at least once.

Each batch is claimed (a short transaction that leases rows), sent outside any
transaction, then settled in another short transaction: sent rows are deleted (or kept
for ``retention``), failed ones retried with backoff on the database clock, hopeless ones
moved to the dead-letter table. A broker outage opens a circuit breaker: rows are handed
back without counting attempts until the broker answers.

``Relay(engine, transport).run()`` loops until :meth:`Relay.stop` (safe from another
thread or a signal handler); ``run(once=True)`` sends what is due, then returns. The loop
itself is :mod:`outboxer.relay.runner`.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine, make_url

from .. import instrumentation
from ..checks import check_number, pool_room
from ..errors import ConfigurationError
from ..retry import Backoff, CircuitBreaker
from ..store import relay as relay_store
from ..store.dead_letters import count_dead_letters
from ..transports.base import Transport
from ..waiter import Waiter, make_waiter
from .decide import DEFAULT_BACKOFF, SendPolicy
from .failures import SendFailure, check_callback, notify
from .liveness import Liveness
from .reports import RelayStats
from .runner import Run

__all__ = ["DEFAULT_BATCH_BYTES", "Relay", "relay_engine"]

log = logging.getLogger("outboxer.relay")

DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
"""A claim's payload bytes at most, by default: with the batches on the wire and the claims
queued ahead, a relay holds a few tens of MiB of messages, whatever their size."""


class Relay:
    """Publishes outbox rows through ``transport``.

    ``batch_size`` rows per claim, and ``batch_bytes`` bytes of payload at most (a larger
    message goes alone); ``max_attempts`` sends before a row is dead-lettered (a
    broker outage does not count; an unroutable message gets ``unroutable_attempts``);
    ``backoff`` spaces retries; ``lease`` is how long a claim stays exclusive while this
    relay lives (a relay that dies frees its rows at once, see docs/relay.md);
    ``poll_interval`` is the idle polling period (jittered) when no PostgreSQL notification
    arrives; ``retention`` keeps sent rows that many seconds instead of deleting them at
    once; ``destinations`` limits the relay to rows for those destinations (a consumer's
    own relay for its retries and replays); ``on_failure(failure, session=...)`` is called
    with a :class:`~outboxer.SendFailure` for each message dead-lettered, after the dead
    letter is stored (alerting, compensations; see :mod:`outboxer.relay.failures`).
    """

    def __init__(
        self,
        engine: Engine,
        transport: Transport,
        *,
        batch_size: int = 1000,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
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
        on_failure: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        _require(
            isinstance(engine, Engine),
            f"Relay needs a SQLAlchemy Engine (outboxer.relay_engine(url)), got {engine!r}",
        )
        _require(
            isinstance(transport, Transport),
            "Relay needs a transport (outboxer.transport_from_url('amqp://...')), "
            f"got {transport!r}",
        )
        check_number("batch_size", batch_size, whole=True, minimum=1)
        check_number("batch_bytes", batch_bytes, whole=True, minimum=1)
        check_number("max_attempts", max_attempts, whole=True, minimum=1)
        check_number("unroutable_attempts", unroutable_attempts, whole=True, minimum=1)
        for setting, seconds in (
            ("lease", lease),
            ("poll_interval", poll_interval),
            ("prune_interval", prune_interval),
        ):
            check_number(setting, seconds, positive=True)
        if retention is not None:
            check_number("retention", retention, minimum=0, duration=True)
        _require(
            isinstance(backoff, Backoff),
            f"backoff must be an outboxer.Backoff(initial, multiplier, max_delay, jitter), "
            f"got {backoff!r}",
        )
        _require(
            destinations is None or (bool(destinations) and not isinstance(destinations, str)),
            f"destinations must be a non-empty list of names, got {destinations!r}",
        )
        self._failure_session = check_callback(on_failure)
        self.on_failure = on_failure
        _require_pool_room(engine)
        self.engine = engine
        self.transport = transport
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.policy = SendPolicy(max_attempts, backoff, unroutable_attempts)
        self.lease = lease
        self.poll_interval = poll_interval
        self.retention = retention
        self.listen = listen
        self.prune_interval = prune_interval
        self.destinations = list(destinations) if destinations is not None else None
        self.name = (name or f"{socket.gethostname()}:{os.getpid()}")[:255]
        self.liveness = Liveness(engine, self.name, lease, limited=destinations is not None)
        self.stats = RelayStats()
        self.breaker = CircuitBreaker()
        self._clock = clock
        self._rand = rand
        self._stop = threading.Event()
        self._running = threading.Lock()
        self._waiter: Waiter | None = None
        self._last_prune = float("-inf")
        self._observing = False

    def notify_failures(self, failures: list[SendFailure]) -> None:
        """Call ``on_failure`` for messages just dead-lettered (the runner's callback)."""
        if self.on_failure is not None and failures:
            notify(self.on_failure, self._failure_session, self.engine, failures)

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
        if not self._running.acquire(blocking=False):
            raise ConfigurationError(
                f"relay {self.name} is already running (run() was called in another thread "
                "and has not returned): one Relay runs one loop; for a second loop make a "
                "second outboxer.Relay (they share the work and keep each key's order)"
            )
        try:
            self._stop.clear()
            self._observe_backlog()
            waiter = None if once else make_waiter(self.engine, listen=self.listen)
            self._waiter = waiter
            try:
                return Run(self, once, waiter).loop()
            finally:
                self._waiter = None
                if waiter is not None:
                    waiter.close()
        finally:
            self._running.release()

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
            try:
                connection = connection.execution_options(isolation_level="READ COMMITTED")
            except BaseException:
                # A pooled connection a restart killed fails here: close it now (left to
                # the garbage collector, the pool logged its reset failure at ERROR).
                connection.invalidate()
                connection.close()
                raise
        return connection

    def _observe_backlog(self) -> None:
        """Let the metrics exporter read backlog figures (only when it asks)."""
        if not self._observing:
            self._observing = True
            instrumentation.get().observe_outbox(self.figures)


CONNECTIONS = 2
"""Connections a relay holds of its engine's pool at once: one keeps its liveness lock for
as long as it runs, one claims and settles (PostgreSQL's LISTEN has one of its own)."""


def _require_pool_room(engine: Engine) -> None:
    """Refuse an engine whose pool cannot lend :data:`CONNECTIONS` at once: every claim
    would wait for the pool's timeout and fail, over and over, with the database fine."""
    room = pool_room(engine)
    _require(
        room is None or room[0] >= CONNECTIONS,
        f"an outboxer.Relay holds {CONNECTIONS} connections of its engine at once (one "
        f"keeps its liveness lock while it runs, one claims and settles), and this engine's "
        f"pool lends {room[0] if room else 0} ({room[1] if room else ''}): create the "
        f"engine with pool_size={CONNECTIONS} or more (or a max_overflow), or give the relay "
        "an engine of its own",
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def relay_engine(url: str, *, network_timeout: float = 30.0, **kwargs: Any) -> Engine:
    """An engine for a relay process: its commits do not wait for the disk, and a dead
    network fails its calls instead of hanging them.

    The relay's own writes (leases, deletes of sent rows, retry times, dead-letter moves)
    need not survive a database crash: losing the last of them only makes the relay send
    those messages again, which the inbox absorbs. On PostgreSQL (psycopg)
    ``synchronous_commit=off`` saves a disk flush per claim and per settle. Set on the
    relay's own connections only, never on an application's.

    ``network_timeout`` bounds how long a call waits on a network that went silent (a
    partition, a firewall that dropped the connection's state): TCP keepalives,
    ``tcp_user_timeout`` and (unless the URL sets one) ``connect_timeout`` on PostgreSQL,
    socket read and write timeouts on MariaDB/MySQL (PyMySQL, whose connect timeout is 10
    s). The call then fails, and the relay treats it as database trouble and
    reconnects. What the URL sets wins over these (its ``options``, a search_path say,
    are kept beside ``synchronous_commit=off``), and so do ``connect_args`` given in
    ``kwargs``, which go to :func:`sqlalchemy.create_engine`.
    """
    parsed = make_url(url)
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    connect_args: dict[str, Any] = {}
    seconds = max(1, round(network_timeout))
    if backend == "postgresql" and driver == "psycopg":
        connect_args = {
            "options": "-c synchronous_commit=off",
            "keepalives": 1,
            "keepalives_idle": max(1, seconds // 3),
            "keepalives_interval": max(1, seconds // 6),
            "keepalives_count": 3,
            "tcp_user_timeout": seconds * 1000,
        }
        if "connect_timeout" not in parsed.query:  # the URL's is the operator's choice
            # libpq otherwise waits forever for a server that accepts and never answers.
            connect_args["connect_timeout"] = seconds
    elif backend in ("mysql", "mariadb") and driver == "pymysql":
        connect_args = {"read_timeout": seconds, "write_timeout": seconds}
    # The URL's settings and ``connect_args`` given here are the operator's: they win. Its
    # libpq ``options`` (search_path, statement_timeout...) go after the relay's own
    # ``-c`` settings, so a setting given twice is the operator's (the last one counts).
    for name, value in parsed.query.items():
        if name == "options" and "options" in connect_args:
            url_options = value if isinstance(value, str) else " ".join(value)
            connect_args["options"] = f"{connect_args['options']} {url_options}"
        else:
            connect_args.pop(name, None)
    given = dict(kwargs.pop("connect_args", {}))
    if "options" in given and "options" in connect_args:
        given["options"] = f"{connect_args['options']} {given['options']}"
    connect_args.update(given)
    if connect_args:
        kwargs["connect_args"] = connect_args
    return create_engine(parsed, **kwargs)
