"""Running a consumer against a broker: the options, the event loop, the scheduler beside.

:meth:`outboxer.Consumer.run` and :meth:`~outboxer.Consumer.run_async` check their
options here and hand over to :class:`~outboxer.runner.Runner` (the delivery loop),
with the consumer's scheduled handlers (:mod:`outboxer.scheduling`) ticking beside it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Connection, Engine

from .checks import check_number, pool_room
from .errors import ConfigurationError
from .plan import plural
from .reports import ConsumerStats
from .runner import Runner, RunOptions
from .scheduling import Scheduler
from .transports.base import Transport

if TYPE_CHECKING:
    from .consumer import Consumer

__all__ = ["check_runnable", "consume", "run_blocking"]

T = TypeVar("T")

log = logging.getLogger("outboxer.consumer")


def check_runnable(consumer: Consumer, options: RunOptions) -> None:
    """Refuse a run that cannot work, before anything is created."""
    if not consumer.registry and not consumer.schedules:
        raise ConfigurationError(
            f"consumer {consumer.name!r} has no handlers: register one with "
            "@consumer.handler(MessageType) before running it"
        )
    check_number("concurrency", options.concurrency, whole=True, minimum=1)
    for option in ("idle_timeout", "prune_interval", "extend_after", "extend_by"):
        check_number(option, getattr(options, option), positive=True)


async def consume(consumer: Consumer, transport: Transport, options: RunOptions) -> ConsumerStats:
    """One run: the delivery loop, and the scheduled handlers beside it."""
    consumer.check_names(transport)
    _warn_if_pool_too_small(consumer, options.concurrency)
    runner = Runner(
        consumer.name,
        consumer.processor(),
        consumer.is_async,
        transport,
        consumer.subscription(options.concurrency),
        options,
        consumer.stop_signal,
        consumer.prune_async if consumer.is_async else consumer.prune_in_thread,
        consumer.stats,
    )
    if not consumer.schedules:
        return await runner.run()
    scheduler = Scheduler(consumer.schedules, consumer.session_factory)
    ticking = asyncio.create_task(scheduler.keep_running(consumer.stop_signal, once=options.once))
    try:
        return await runner.run()
    finally:
        await ticking  # a run in progress finishes; the stop ends the loop


def _warn_if_pool_too_small(consumer: Consumer, concurrency: int) -> None:
    """One warning when the workers outnumber the connections the consumer's engine lends:
    they queue for each other's, and past ``pool_timeout`` a delivery goes back."""
    bind = getattr(consumer.session_factory, "kw", {}).get("bind")
    engine = getattr(bind, "sync_engine", bind)  # an AsyncEngine's
    if isinstance(engine, Connection):
        return  # one connection, shared on purpose
    room = pool_room(engine) if isinstance(engine, Engine) else None
    if room is not None and room[0] < concurrency:
        log.warning(
            "consumer %s runs %d workers and its engine's pool lends %s (%s): the workers "
            "queue for connections, and one that waits past pool_timeout gives its delivery "
            "back; create the engine with pool_size=%d or more",
            consumer.name,
            concurrency,
            plural(room[0], "connection"),
            room[1],
            concurrency,
        )


def run_blocking(consumer: Consumer, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())``; from inside a running event loop (a notebook), in a
    thread of its own, which only a sync consumer may do."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    if consumer.is_async:
        raise ConfigurationError(
            f"consumer {consumer.name!r} has async handlers and an event loop is running "
            "here: use 'await consumer.run_async(transport, ...)' in that loop"
        )
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"outboxer-{consumer.name}-loop")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
