"""``outboxer relay``: publish outbox rows to the broker."""

from __future__ import annotations

import logging
import sys
import threading

import click

from .. import heartbeat
from ..errors import BrokerUnavailable, ConfigurationError
from ..plan import plural
from ..relay import Relay, relay_engine
from ..relay.failures import check_callback
from ..relay.relay import DEFAULT_BATCH_BYTES
from ..retry import Backoff
from ..secrets import mask_url
from ..transports import transport_from_url
from . import heap
from .common import (
    Seconds,
    broker_option,
    db_option,
    import_target,
    in_process_broker,
    make_engine,
    running_as_command,
    setting,
)
from .health import observability, service_options
from .readiness import broker_check, database_check, wait_until
from .signals import graceful_stop

log = logging.getLogger("outboxer.relay")


@click.command()
@db_option()
@broker_option(
    memory="not memory://, which only works inside one process (Relay(...) and the consumer "
    "in one program: tests, outboxer demo)"
)
@setting("--batch-size", default=1000, type=click.IntRange(1, 10_000), help="Rows per claim.")
@setting(
    "--batch-bytes",
    default=DEFAULT_BATCH_BYTES,
    type=click.IntRange(1024, 1024**3),
    help="Payload bytes per claim at most (a larger message goes alone): bounds the relay's "
    "memory whatever the message sizes.",
)
@setting(
    "--max-attempts",
    default=10,
    type=click.IntRange(1),
    help="Sends before a message is dead-lettered (broker outages do not count).",
)
@setting(
    "--poll-interval",
    default=1.0,
    type=Seconds(0.01),
    help="Idle polling period in seconds (PostgreSQL is woken by NOTIFY sooner).",
)
@setting("--lease", default=60.0, type=Seconds(1), help="Seconds a claim stays exclusive.")
@setting(
    "--retry-delay",
    default=1.0,
    type=Seconds(0.001),
    help="First retry delay in seconds; doubles per attempt, jittered.",
)
@setting(
    "--max-retry-delay",
    default=300.0,
    type=Seconds(0.001),
    help="Cap on each retry delay.",
)
@setting(
    "--retention",
    default=None,
    type=Seconds(0),
    help="Keep sent rows this many seconds (default: delete at once).",
)
@setting("--name", default=None, help="This relay's name in leases and logs (default host:pid).")
@setting("--listen/--no-listen", default=True, help="Use PostgreSQL LISTEN/NOTIFY to wake up.")
@setting(
    "--on-failure",
    default=None,
    metavar="PKG.MODULE:FUNCTION",
    help="Called with each message the relay dead-letters (alerting): see docs/error-channels.md.",
)
@setting("--once", is_flag=True, default=False, help="Send what is due, then exit.")
@service_options
def relay(
    db_url: str,
    broker_url: str,
    batch_size: int,
    batch_bytes: int,
    max_attempts: int,
    poll_interval: float,
    lease: float,
    retry_delay: float,
    max_retry_delay: float,
    retention: float | None,
    name: str | None,
    listen: bool,
    on_failure: str | None,
    once: bool,
    health_port: tuple[str, int] | None,
    metrics_port: tuple[str, int] | None,
    liveness_timeout: float,
) -> None:
    """Publish outbox rows to RabbitMQ or SQS, in order per key, with retries.

    At start it checks the database (and outboxer's tables) and the broker: an unreachable
    one is waited for (with --once: exit 4 or 7 at once), refused credentials or missing
    tables exit at once (5, 8, 6). SIGTERM or SIGINT finishes the batch in flight, then
    exits; a second one exits at once.
    """
    if max_retry_delay < retry_delay:
        raise click.BadParameter("must be >= --retry-delay", param_hint="--max-retry-delay")
    callback = None
    if on_failure is not None:
        callback = import_target(on_failure, "--on-failure", "myapp.alerts:undeliverable")
        if not callable(callback):
            raise click.BadParameter(
                f"{on_failure} is {type(callback).__name__}, not a function",
                param_hint="--on-failure",
            )
        try:  # before any connection: the flag is what to fix
            check_callback(callback)
        except ConfigurationError as exc:
            raise click.BadParameter(f"{on_failure}: {exc}", param_hint="--on-failure") from exc
    engine = make_engine(db_url, factory=relay_engine)
    if in_process_broker(broker_url) and running_as_command():
        engine.dispose()
        raise ConfigurationError(
            f"--broker {mask_url(broker_url)} is an in-process broker: memory:// only works "
            "inside one process (outboxer.Relay(...) and the consumer in the same program, "
            "as in tests and outboxer demo), and this relay would send every message where "
            "no consumer can read it, then delete it from the outbox; use the broker the "
            "consumers read (amqp://, sqs://?region=..., sns://?region=...)"
        )
    transport = transport_from_url(broker_url)
    worker = Relay(
        engine,
        transport,
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        max_attempts=max_attempts,
        backoff=Backoff(retry_delay, 2.0, max_retry_delay, 0.2),
        lease=lease,
        poll_interval=poll_interval,
        retention=retention,
        listen=listen,
        name=name,
        on_failure=callback,
    )
    stopping = threading.Event()

    def stop() -> None:
        stopping.set()
        worker.stop()

    log.info(
        "relay %s starting: %s -> %s (batch %d, max attempts %d%s); checking both",
        worker.name,
        mask_url(db_url),
        mask_url(broker_url),
        batch_size,
        max_attempts,
        ", once" if once else "",
    )
    checks = [database_check(engine, db_url), broker_check(transport, broker_url)]
    loop = f"relay {worker.name}"  # the key the relay's loop beats under (outboxer.heartbeat)
    try:
        with (
            graceful_stop(stop, "finishing the batch in flight"),
            observability(
                "outboxer-relay",
                health_port=health_port,
                metrics_port=metrics_port,
                liveness=lambda: heartbeat.seconds_since(loop),
                liveness_timeout=liveness_timeout,
                checks=checks,
            ),
        ):
            if not wait_until(
                checks,
                wait=not once,
                stop=stopping,
                tick=lambda: heartbeat.beat(loop),
            ):
                return
            log.info("relay %s started", worker.name)
            if not once:
                heap.settle()
            stats = worker.run(once=once)
    finally:
        transport.close()
        engine.dispose()
    log.info(
        "relay %s stopped: %s sent, %s retried, %s dead-lettered in %s",
        worker.name,
        stats.sent,
        stats.retried,
        stats.dead_lettered,
        plural(stats.batches, "batch", "batches"),
    )
    if once and stats.outages:
        click.echo("the broker was unavailable; unsent messages stay in the outbox", err=True)
        sys.exit(BrokerUnavailable.exit_code)
