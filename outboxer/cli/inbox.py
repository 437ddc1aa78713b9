"""``outboxer-inbox PKG.MODULE:consumer`` (the consumer runner) and ``outboxer inbox prune``."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

import click
from sqlalchemy.engine import Connection
from sqlalchemy.orm import sessionmaker

from .. import heartbeat
from ..consumer import Consumer, ConsumerStats
from ..diagnosis import database_setting, diagnose
from ..errors import BrokerAccessDenied, BrokerUnavailable, OperatorError, TransportError
from ..plan import plural
from ..relay.embedded import OwnRelay, consumer_engine
from ..secrets import mask_url
from ..store import dead_letters as dead_letter_store
from ..store import inbox as inbox_store
from ..store.schema import require_tables, require_writable
from ..transports import Transport, transport_from_url
from . import heap
from .common import (
    INBOX_ENV_PREFIX,
    Duration,
    Seconds,
    broker_option,
    console,
    db_option,
    failure,
    import_target,
    in_process_broker,
    make_engine,
    setting,
)
from .health import observability, service_options
from .readiness import (
    STARTUP_BACKOFF,
    Check,
    async_database_check,
    bound_url,
    broker_check,
    in_memory_sqlite,
    wait_until,
)
from .shell import configure_logging, configure_logging_later, equip
from .signals import graceful_stop

log = logging.getLogger("outboxer.consumer")


def load_consumer(target: str) -> Consumer:
    """Import ``package.module:attribute`` and return the Consumer it names."""
    obj = import_target(target, "CONSUMER", "myapp.consumers:billing")
    if callable(obj) and not isinstance(obj, (Consumer, type)):  # a function returning one
        try:
            obj = obj()
        except Exception as exc:
            if isinstance(exc, OperatorError) or diagnose(exc) is not None:
                raise  # its database: the operator's to fix (exit 4, 5, 6)
            raise click.BadParameter(
                f"calling {target} failed: {failure(exc)}", param_hint="CONSUMER"
            ) from exc
    if not isinstance(obj, Consumer):
        kind = f"the class {obj.__name__}" if isinstance(obj, type) else type(obj).__name__
        raise click.BadParameter(
            f"{target} is {kind}, not an outboxer.Consumer (or a function returning one)",
            param_hint="CONSUMER",
        )
    return obj


@click.command(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "show_default": True,
    }
)
@click.argument("target", metavar="CONSUMER", envvar="OUTBOXER_INBOX_CONSUMER")
@broker_option()
@setting(
    "--concurrency", default=4, type=click.IntRange(1, 1000), help="Messages processed at a time."
)
@setting(
    "--batch-size",
    default=None,
    type=click.IntRange(1, 10000),
    help="Deliveries a worker runs in one transaction per handler (1: no batching); "
    "default: the consumer's batch_size (20).",
)
@setting(
    "--slow-handler-warning",
    default=None,
    type=Seconds(1),
    metavar="SECONDS",
    help="Log a warning when a handler run has lasted this long (again each time it has run "
    "twice as long); default: the consumer's slow_handler_warning (60).",
)
@setting("--once", is_flag=True, default=False, help="Process what is queued, then exit.")
@setting(
    "--relay/--no-relay",
    default=True,
    help="Also send this consumer's delayed retries and dead-letter replays (outbox rows "
    "addressed to it). --no-relay when an 'outboxer relay' runs on its database.",
)
@service_options
def main(
    target: str,
    broker_url: str,
    concurrency: int,
    batch_size: int | None,
    slow_handler_warning: float | None,
    once: bool,
    relay: bool,
    health_port: tuple[str, int] | None,
    metrics_port: tuple[str, int] | None,
    liveness_timeout: float,
) -> None:
    """Run the handlers of CONSUMER (PACKAGE.MODULE:ATTRIBUTE) on messages from the broker.

    CONSUMER (also OUTBOXER_INBOX_CONSUMER) names an outboxer.Consumer, or a function
    returning one. The application module is imported first, so its own logging
    configuration wins. At start the database (outboxer's tables) and the broker are
    checked; an unreachable broker is waited for, with backoff (with --once: exit 7).
    Unless --no-relay, a relay thread sends the outbox rows addressed to this consumer
    (its delayed retries and dead-letter replays), and nothing else. SIGTERM or SIGINT
    stops receiving and finishes the messages in progress; a second one exits at once.
    """
    # No --db here: the database is the application's, through CONSUMER's session factory.
    previous = database_setting(
        f"the URL of the engine {target} uses (the application's own setting)"
    )
    click.get_current_context().call_on_close(lambda: database_setting(previous))
    consumer = load_consumer(target)
    if batch_size is not None:
        consumer.batch_size = batch_size
    if slow_handler_warning is not None:
        consumer.slow_handler_warning = slow_handler_warning
    configure_logging()
    transport = transport_from_url(broker_url)
    validate_names(consumer, transport)
    stopping = threading.Event()
    own = own_relay(consumer, broker_url, on_crash=lambda _exc: stop()) if relay else None

    def stop() -> None:
        stopping.set()
        consumer.stop()
        if own is not None:
            own.relay.stop()

    if not relay and in_process_broker(broker_url):
        log.warning(
            "--broker %s is this process's own in-process broker: with --no-relay it "
            "receives only what this process sends; nothing relayed from another process "
            "(an outboxer relay) can arrive. Drop --no-relay, or use the broker the relay "
            "sends to (amqp://, sqs://, sns://)",
            mask_url(broker_url),
        )
    log.info(
        "consumer %s starting on %s (concurrency %d, batches of up to %d%s%s)",
        consumer.name,
        mask_url(broker_url),
        concurrency,
        consumer.batch_size,
        ", once" if once else "",
        "" if relay else ", no relay",
    )
    checks = [consumer_database_check(consumer), broker_check(transport, broker_url)]
    try:
        with (
            graceful_stop(stop, "finishing the messages in progress"),
            observability(
                f"outboxer-inbox-{consumer.name}",
                health_port=health_port,
                metrics_port=metrics_port,
                liveness=lambda: _oldest_beat(consumer, own),
                stalled=lambda: heartbeat.stalled(loop_key(consumer)),
                liveness_timeout=liveness_timeout,
                checks=checks,
            ),
        ):
            stats = run_until_stopped(
                consumer,
                transport,
                broker_url,
                concurrency,
                once,
                stopping,
                checks,
                ready=own.start if own is not None and not once else None,
            )
            if own is not None and once and stats is not None:
                own.run_once()  # what is due now: a delayed retry waits for the next run
    finally:
        transport.close()
        if own is not None:
            own.stop()
            own.relay.transport.close()
    if own is not None and own.error is not None:
        raise own.error  # the consumer stopped because its relay did
    if stats is not None:
        log.info(
            "consumer %s: %s, %s processed, %s, %s, %s dead-lettered",
            consumer.name,
            plural(stats.messages, "message"),
            stats.processed,
            plural(stats.duplicates, "duplicate"),
            plural(stats.retries_scheduled, "retry", "retries"),
            stats.dead_lettered + stats.rejected,
        )


def run_until_stopped(
    consumer: Consumer,
    transport: Transport,
    broker_url: str,
    concurrency: int,
    once: bool,
    stopping: threading.Event,
    checks: list[Check] | None = None,
    ready: Callable[[], None] | None = None,
) -> ConsumerStats | None:
    """Check, then run ``consumer``; if the broker goes away before the consumer could
    subscribe, wait for it (one line per attempt) and run again, until stopped. ``ready``
    is called once the checks pass, before each run (the consumer's own relay starts)."""
    attempt = 0
    while True:
        if not wait_until(
            checks or [],
            wait=not once,
            stop=stopping,
            tick=lambda: heartbeat.beat(loop_key(consumer)),
        ):
            return None
        if ready is not None:
            ready()
        if not (once or attempt):
            heap.settle()
        try:
            return consumer.run(transport, once=once, concurrency=concurrency)
        except TransportError as exc:
            problem = diagnose(exc, broker_url=broker_url)
            if isinstance(problem, BrokerAccessDenied):
                raise problem from exc
            if once or not isinstance(problem, BrokerUnavailable) or stopping.is_set():
                raise
            attempt += 1
            pause = STARTUP_BACKOFF.delay(attempt)
            log.warning("%s (attempt %d; trying again in %.1f s)", problem, attempt, pause)
            heartbeat.beat(loop_key(consumer))  # waiting for the broker is not being stuck
            stopping.wait(pause)
            if stopping.is_set():
                return None


def own_relay(
    consumer: Consumer, broker_url: str, on_crash: Callable[[BaseException], None]
) -> OwnRelay:
    """The relay of the rows addressed to ``consumer``, on its database, with a transport
    of its own (see :mod:`outboxer.relay.embedded`)."""
    engine, created = consumer_engine(consumer.session_factory)
    return OwnRelay(
        engine,
        transport_from_url(broker_url),
        consumer.name,
        on_crash=on_crash,
        dispose=created,
        name=f"{consumer.name}@{socket.gethostname()}:{os.getpid()}",
    )


def _oldest_beat(consumer: Consumer, own: OwnRelay | None) -> float | None:
    """Seconds since the slower of the consumer's loop and its relay's loop last turned."""
    ages = [heartbeat.seconds_since(loop_key(consumer))]
    if own is not None and own.error is None:
        ages.append(heartbeat.seconds_since(f"relay {own.name}"))
    known = [age for age in ages if age is not None]
    return max(known) if known else None


def loop_key(consumer: Consumer) -> str:
    """The key the consumer's loop beats under (:mod:`outboxer.heartbeat`)."""
    return f"consumer {consumer.name}"


def validate_names(consumer: Consumer, transport: Transport) -> None:
    """The consumer's name and its types' destinations are names this broker accepts
    (:class:`~outboxer.errors.InvalidName` otherwise: exit 3, before anything is created)."""
    consumer.check_names(transport)


def consumer_database_check(consumer: Consumer) -> Check:
    """The consumer's database answers and holds outboxer's tables (for an async consumer,
    through an engine of its own on the same URL: :func:`.readiness.async_database_check`)."""
    if consumer.is_async:
        return async_database_check(consumer.session_factory)

    def check() -> None:
        url = bound_url(consumer.session_factory)
        if url is not None and in_memory_sqlite(url):
            return  # the checks run in a thread of their own: its connection, its database
        try:
            with consumer.session_factory() as session:
                require_tables(session.connection())
                require_writable(session.connection(), url and url.render_as_string(False))
        except OperatorError:
            raise
        except Exception as exc:
            problem = diagnose(exc, db_url=url and url.render_as_string(hide_password=True))
            if problem is None:
                raise
            raise problem from exc

    return check


@click.group("inbox")
def inbox_group() -> None:
    """Maintain the inbox table."""


@inbox_group.command()
@db_option()
@setting("--older-than", default="7d", type=Duration(), help="Inbox rows older than this go.")
@setting("--dead-letters-older-than", type=Duration(), help="Also delete dead letters this old.")
@setting(
    "--batch-size", default=1000, type=click.IntRange(1, 100_000), help="Rows per transaction."
)
def prune(
    db_url: str, older_than: float, dead_letters_older_than: float | None, batch_size: int
) -> None:
    """Delete old inbox rows (and old dead letters) in small batches, without long locks."""
    engine = make_engine(db_url)
    Session = sessionmaker(engine)
    counts = {"inbox rows": 0, "dead letters": 0}

    def prune_inbox(connection: Connection) -> int:
        return inbox_store.prune_inbox(connection, older_than=older_than, limit=batch_size)

    jobs: list[tuple[str, Callable[[Connection], int]]] = [("inbox rows", prune_inbox)]
    if dead_letters_older_than is not None:
        age = dead_letters_older_than

        def prune_dead_letters(connection: Connection) -> int:
            return dead_letter_store.prune_dead_letters(
                connection, older_than=age, limit=batch_size
            )

        jobs.append(("dead letters", prune_dead_letters))
    try:
        for name, job in jobs:
            while True:
                with Session.begin() as session:
                    deleted = job(session.connection())
                counts[name] += deleted
                if deleted < batch_size:
                    break
    finally:
        engine.dispose()
    console.print(", ".join(f"deleted {plural(n, name[:-1], name)}" for name, n in counts.items()))


configure_logging_later(main)
equip(main, INBOX_ENV_PREFIX)
