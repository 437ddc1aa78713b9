"""The relay's error channel survives a callback that raises a BaseException.

``Relay(on_failure=...)`` is application code: a pager client's timeout may surface as
``asyncio.CancelledError`` (a BaseException since Python 3.8), a library may raise its
own BaseException subclass (gevent's ``Timeout``). Such a callback used to end the
relay's run; like any other exception it is logged and the relay carries on (the dead
letter stays). KeyboardInterrupt and SystemExit still stop the relay: they are how a
process is asked to end.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport
from outboxer.transports import SendResult

from .models import OrderPlaced
from .test_relay import dead_letters, outbox_rows, publish, wait_until

SessionFactory = sessionmaker[outboxer.OutboxSession]


class PagerGaveUp(BaseException):
    """A library's own BaseException (as gevent.Timeout is)."""


def _relay(engine: Engine, broker: MemoryBroker, on_failure: object) -> outboxer.Relay:
    return outboxer.Relay(
        engine, MemoryTransport(broker), max_attempts=1, on_failure=on_failure, poll_interval=0.05
    )


@pytest.mark.parametrize(
    "raised", [asyncio.CancelledError("pager timed out"), PagerGaveUp("pager gave up")]
)
@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)
def test_a_callback_raising_a_base_exception_is_logged_and_the_relay_carries_on(
    engine: Engine,
    Session: SessionFactory,
    raised: BaseException,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def on_failure(failure: outboxer.SendFailure) -> None:
        seen.append(str(failure.message_id))
        raise raised

    broker = MemoryBroker()
    relay = _relay(engine, broker, on_failure)
    publish(Session, OrderPlaced(order_id=1), OrderPlaced(order_id=2), OrderPlaced(order_id=3))
    broker.fail_next(2, SendResult.rejected("too_large", "message too large"))
    ended: list[str] = []

    def run() -> None:
        try:
            relay.run()
            ended.append("returned")
        except BaseException as exc:  # what the bug did: the callback's exception escaped
            ended.append(f"raised {type(exc).__name__}")

    thread = threading.Thread(target=run, daemon=True)
    with caplog.at_level(logging.ERROR, logger="outboxer.relay"):
        thread.start()
        try:
            wait_until(lambda: len(seen) == 2 or bool(ended), what="the two callbacks")
            assert len(seen) == 2, f"the callback ran {len(seen)} times; the run ended: {ended}"
            # The relay still sends what is published afterwards.
            publish(Session, OrderPlaced(order_id=4))
            wait_until(lambda: not outbox_rows(engine) or bool(ended), what="order 4 sent")
            assert ended == [], f"the relay's run ended: {ended}"
        finally:
            relay.stop()
            thread.join(10)
    assert ended == ["returned"]
    assert len(dead_letters(engine)) == 2
    assert len(broker.published) == 2
    logged = [r.getMessage() for r in caplog.records if "on_failure raised" in r.getMessage()]
    assert len(logged) == 2 and type(raised).__name__ in logged[0]


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_keyboard_interrupt_and_system_exit_from_a_callback_still_stop_the_relay(
    engine: Engine, Session: SessionFactory, raised: type[BaseException]
) -> None:
    def on_failure(failure: outboxer.SendFailure) -> None:
        raise raised()

    broker = MemoryBroker()
    publish(Session, OrderPlaced(order_id=1))
    broker.fail_next(1, SendResult.rejected("too_large", "message too large"))
    with pytest.raises(raised):
        _relay(engine, broker, on_failure).run(once=True)
    assert len(dead_letters(engine)) == 1  # committed before the callback ran
