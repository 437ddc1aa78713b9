"""``outboxer relay``: publish outbox rows to the broker."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click

from ..relay import Relay, relay_engine
from ..retry import Backoff
from ..tracing import configure_from_env
from ..transports import redact_url, transport_from_url
from .common import db_option, make_engine, option, safe_url

log = logging.getLogger("outboxer.relay")


@click.command()
@db_option()
@option(
    "--broker", "broker_url", required=True, metavar="URL", help="amqp://..., sqs://?..., memory://"
)
@option("--batch-size", default=1000, type=click.IntRange(1, 10_000), help="Rows per claim.")
@option(
    "--max-attempts",
    default=10,
    type=click.IntRange(1),
    help="Sends before a message is dead-lettered (broker outages do not count).",
)
@option(
    "--poll-interval",
    default=1.0,
    type=click.FloatRange(0.01),
    help="Idle polling period in seconds (PostgreSQL is woken by NOTIFY sooner).",
)
@option("--lease", default=60.0, type=click.FloatRange(1), help="Seconds a claim stays exclusive.")
@option(
    "--retry-delay",
    default=1.0,
    type=click.FloatRange(0.001),
    help="First retry delay in seconds; doubles per attempt, jittered.",
)
@option(
    "--max-retry-delay",
    default=300.0,
    type=click.FloatRange(0.001),
    help="Cap on each retry delay.",
)
@option(
    "--retention",
    default=None,
    type=click.FloatRange(0),
    help="Keep sent rows this many seconds (default: delete at once).",
)
@option("--name", default=None, help="This relay's name in leases and logs (default host:pid).")
@option("--listen/--no-listen", default=True, help="Use PostgreSQL LISTEN/NOTIFY to wake up.")
@option("--once", is_flag=True, default=False, help="Send what is due, then exit.")
def relay(
    db_url: str,
    broker_url: str,
    batch_size: int,
    max_attempts: int,
    poll_interval: float,
    lease: float,
    retry_delay: float,
    max_retry_delay: float,
    retention: float | None,
    name: str | None,
    listen: bool,
    once: bool,
) -> None:
    """Publish outbox rows to RabbitMQ or SQS, in order per key, with retries.

    SIGTERM or SIGINT finishes the batch in flight, then exits.
    """
    if max_retry_delay < retry_delay:
        raise click.BadParameter("must be >= --retry-delay", param_hint="--max-retry-delay")
    engine = make_engine(db_url, factory=relay_engine)
    shutdown_telemetry = configure_from_env("outboxer-relay")
    try:
        transport = transport_from_url(broker_url)
    except Exception as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc
    worker = Relay(
        engine,
        transport,
        batch_size=batch_size,
        max_attempts=max_attempts,
        backoff=Backoff(retry_delay, 2.0, max_retry_delay, 0.2),
        lease=lease,
        poll_interval=poll_interval,
        retention=retention,
        listen=listen,
        name=name,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: finishing the batch in flight", signal.Signals(signum).name)
        worker.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "relay %s started: %s -> %s (batch %d, max attempts %d%s)",
        worker.name,
        safe_url(db_url),
        redact_url(broker_url),
        batch_size,
        max_attempts,
        ", once" if once else "",
    )
    try:
        stats = worker.run(once=once)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        transport.close()
        engine.dispose()
        shutdown_telemetry()
    log.info(
        "relay %s stopped: %d sent, %d retried, %d dead-lettered in %d batches",
        worker.name,
        stats.sent,
        stats.retried,
        stats.dead_lettered,
        stats.batches,
    )
    if once and stats.outages:
        click.echo("the broker was unavailable; unsent messages stay in the outbox", err=True)
        sys.exit(1)
