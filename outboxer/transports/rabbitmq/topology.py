"""The AMQP calls that set a consumer's queue up (declare, bind, consume), run one after
another on the I/O thread, each from the previous one's reply.

:meth:`~outboxer.transports.rabbitmq.receiver._RabbitReceiver._on_channel_open` builds the
sequence of a subscription; :func:`_run_steps` runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pika.channel import Channel

from .ioloop import _logged

# One asynchronous AMQP call of a set-up sequence, given the continuation to reply to.
_Step = Callable[[Callable[[Any], None]], object]


def _declare_exchange(channel: Channel, name: str, k: Callable[[Any], None]) -> None:
    channel.exchange_declare(name, "topic", durable=True, callback=k)


def _bind(channel: Channel, queue: str, exchange: str, key: str, k: Callable[[Any], None]) -> None:
    channel.queue_bind(queue, exchange, key, callback=k)


def _declare_queue(
    channel: Channel, queue: str, arguments: dict[str, object] | None, k: Callable[[Any], None]
) -> None:
    channel.queue_declare(queue, durable=True, arguments=arguments, callback=k)


def _consume(
    channel: Channel, queue: str, on_message: Callable[..., None], k: Callable[[Any], None]
) -> None:
    channel.basic_consume(queue, on_message, callback=k)


def _run_steps(steps: list[_Step], done: Callable[[], None]) -> None:
    """Run asynchronous AMQP calls one after the other, each from the previous one's reply."""
    remaining = iter(steps)

    @_logged
    def next_step(_frame: object = None) -> None:
        step = next(remaining, None)
        if step is None:
            done()
        else:
            step(next_step)

    next_step()
