"""Outages are one line at WARNING; their traceback only at DEBUG (the operator-error rule).

A consumer whose broker went away logged "cannot reach the broker" with a full traceback
at WARNING on the first failure of every outage (and a single success started a new
streak): a broker blip printed a page of pika internals into an operator's log.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .broker_rabbitmq import rabbitmq_address
from .faultproxy import FaultProxy
from .services import RABBITMQ_URL, port_open, require


def test_a_consumer_losing_its_broker_logs_one_line_and_the_traceback_at_debug(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    require("RabbitMQ", port_open(*rabbitmq_address()), RABBITMQ_URL)
    engine = create_engine(f"sqlite:///{tmp_path}/app.sqlite")
    outboxer.create_all(engine)
    consumer = outboxer.Consumer(
        sessionmaker(engine, class_=outboxer.OutboxSession), name=f"q-{uuid.uuid4().hex[:8]}"
    )

    @consumer.handler("test.t", destination=f"d-{uuid.uuid4().hex[:8]}")
    def handle(event: dict[str, object]) -> None:
        pass

    caplog.set_level(logging.DEBUG, logger="outboxer")
    with FaultProxy.to(RABBITMQ_URL, 5672) as proxy:
        transport = outboxer.transport_from_url(proxy.url(RABBITMQ_URL))
        thread = threading.Thread(target=consumer.run, args=(transport,), daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while proxy.stats.connections == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            proxy.down()  # cut what is open, refuse what comes
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not [
                r for r in caplog.records if "cannot reach the broker" in r.getMessage()
            ]:
                time.sleep(0.05)
        finally:
            consumer.stop()
            thread.join(30)
            transport.close()
            engine.dispose()
    assert not thread.is_alive()
    outage = [r for r in caplog.records if "cannot reach the broker" in r.getMessage()]
    assert outage and all(r.levelno == logging.WARNING for r in outage)
    ours = [r for r in caplog.records if r.name.startswith("outboxer")]  # pika's: cli/logs.py
    loud = [r.getMessage() for r in ours if r.exc_info and r.levelno > logging.DEBUG]
    assert not loud, loud
    assert any(r.exc_info for r in ours if r.levelno == logging.DEBUG)
