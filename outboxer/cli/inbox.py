"""``outboxer-inbox PKG.MODULE:consumer`` (the consumer runner) and ``outboxer inbox prune``."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

import click
from sqlalchemy.engine import Connection
from sqlalchemy.orm import sessionmaker

from ..consumer import Consumer
from ..plan import plural
from ..store import dead_letters as dead_letter_store
from ..store import inbox as inbox_store
from ..tracing import configure_from_env
from ..transports import redact_url, transport_from_url
from .common import Duration, configure_logging, console, db_option, make_engine, option

log = logging.getLogger("outboxer.consumer")


def load_consumer(target: str) -> Consumer:
    """Import ``package.module:attribute`` and return the Consumer it names."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(
            f"{target!r} is not PACKAGE.MODULE:ATTRIBUTE (for example myapp.consumers:billing)",
            param_hint="CONSUMER",
        )
    # The current directory goes last: the application's module is found there, but a
    # stray file (a pika.py, a json.py) never replaces an installed package.
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path and "." not in sys.path:
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="CONSUMER"
        ) from exc
    obj = getattr(module, attribute, None)
    if callable(obj) and not isinstance(obj, Consumer):
        obj = obj()
    if not isinstance(obj, Consumer):
        raise click.BadParameter(
            f"{target} is {type(obj).__name__}, not an outboxer.Consumer", param_hint="CONSUMER"
        )
    return obj


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("target", metavar="CONSUMER", envvar="OUTBOXER_CONSUMER")
@option(
    "--broker", "broker_url", required=True, metavar="URL", help="amqp://..., sqs://?..., memory://"
)
@option(
    "--concurrency", default=4, type=click.IntRange(1, 1000), help="Messages processed at a time."
)
@option("--once", is_flag=True, default=False, help="Process what is queued, then exit.")
@option(
    "--log-level",
    default="INFO",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def main(target: str, broker_url: str, concurrency: int, once: bool, log_level: str) -> None:
    """Run the handlers of CONSUMER (PACKAGE.MODULE:ATTRIBUTE) on messages from the broker.

    CONSUMER (also OUTBOXER_CONSUMER) names an outboxer.Consumer, or a function returning
    one. SIGTERM or SIGINT stops receiving, finishes the messages in progress, then exits.
    """
    configure_logging(log_level)
    consumer = load_consumer(target)
    shutdown_telemetry = configure_from_env(f"outboxer-inbox-{consumer.name}")
    try:
        transport = transport_from_url(broker_url)
    except Exception as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: finishing the messages in progress", signal.Signals(signum).name)
        consumer.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "consumer %s on %s (concurrency %d%s)",
        consumer.name,
        redact_url(broker_url),
        concurrency,
        ", once" if once else "",
    )
    try:
        stats = consumer.run(transport, once=once, concurrency=concurrency)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        transport.close()
        shutdown_telemetry()
    log.info(
        "consumer %s: %s, %d processed, %s, %s, %d dead-lettered",
        consumer.name,
        plural(stats.messages, "message"),
        stats.processed,
        plural(stats.duplicates, "duplicate"),
        plural(stats.retries_scheduled, "retry", "retries"),
        stats.dead_lettered + stats.rejected,
    )


@click.group("inbox")
def inbox_group() -> None:
    """Maintain the inbox table."""


@inbox_group.command()
@db_option()
@option("--older-than", default="7d", type=Duration(), help="Inbox rows older than this go.")
@option("--dead-letters-older-than", type=Duration(), help="Also delete dead letters this old.")
@option("--batch-size", default=1000, type=click.IntRange(1, 100_000), help="Rows per transaction.")
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
    console.print(", ".join(f"deleted {n} {name}" for name, n in counts.items()))
