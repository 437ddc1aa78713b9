"""Relay test helpers and fixtures: broker targets that collect what a relay sends, and
relay processes (the real ``outboxer relay`` command) started and stopped by tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.transports import Delivery, Receiver, Subscription, Transport

from .broker_rabbitmq import RabbitMQAdmin, rabbitmq_address
from .services import RABBITMQ_URL, port_open, require

SessionFactory = sessionmaker[outboxer.OutboxSession]
OUTBOXER = str(Path(sys.executable).parent / "outboxer")


@dataclass
class Target:
    """A broker destination with a queue that collects everything sent to it."""

    kind: str
    url: str
    transport: Transport
    destination: str
    receiver: Receiver
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        self.receiver.close()
        self.transport.close()
        for clean in self.cleanup:
            clean()

    def collect(self, count: int, timeout: float = 60.0) -> list[Delivery]:
        """Receive until ``count`` messages arrived and nothing more comes for a moment."""
        got: list[Delivery] = []
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            batch = self.receiver.receive(max_messages=500, timeout=0.5)
            for delivery in batch:
                delivery.ack()
            got.extend(batch)
            if batch:
                quiet_since = None
            elif len(got) >= count:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 1.0:
                    break
        return got


def rabbitmq_target() -> Target:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start it with: rabbitmq-server -detached")
    transport = outboxer.transport_from_url(RABBITMQ_URL)
    destination = f"relay-{uuid.uuid4().hex[:8]}"
    queue = f"collect-{destination}"
    receiver = transport.receiver(
        Subscription(queue=queue, bindings=[(destination, "#")], prefetch=1000)
    )

    def delete() -> None:
        admin = RabbitMQAdmin()
        try:
            admin.delete(exchanges=[destination, queue], queues=[queue])
        finally:
            admin.close()

    return Target("rabbitmq", RABBITMQ_URL, transport, destination, receiver, [delete])


def sqs_target(endpoint: str, fifo: bool) -> Target:
    from outboxer.transports.sqs import SQSTransport

    destination = f"relay-{uuid.uuid4().hex[:8]}" + (".fifo" if fifo else "")
    transport = SQSTransport(endpoint_url=endpoint, region="us-east-1")
    receiver = transport.receiver(Subscription(queue=destination, prefetch=10))
    url = f"sqs://?region=us-east-1&endpoint_url={endpoint}"
    return Target("sqs-fifo" if fifo else "sqs", url, transport, destination, receiver)


@pytest.fixture(params=["rabbitmq", "sqs", "sqs-fifo"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "rabbitmq":
        made = rabbitmq_target()
    else:
        made = sqs_target(request.getfixturevalue("moto_endpoint"), request.param == "sqs-fifo")
    yield made
    made.close()


@pytest.fixture
def rabbit() -> Iterator[Target]:
    made = rabbitmq_target()
    yield made
    made.close()


def publish_sequence(
    Session: SessionFactory, destination: str, total: int, keys: int, per_tx: int = 500
) -> dict[str, list[int]]:
    """Publish ``total`` messages over ``keys`` keys, a sequence number per key."""
    expected: dict[str, list[int]] = {}
    for start in range(0, total, per_tx):
        with Session.begin() as session:
            for n in range(start, min(start + per_tx, total)):
                key = f"k{n % keys}"
                seq = len(expected.setdefault(key, []))
                expected[key].append(seq)
                session.publish(
                    {"key": key, "seq": seq, "n": n},
                    type="test.sequenced",
                    destination=destination,
                    key=key,
                )
    return expected


def outbox_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outboxer.outbox)).scalar_one())


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a command whose stderr goes to a file, never a pipe nobody reads while it runs.

    A pipe fills at 64 KiB and then blocks the process on its next log line, which looks
    exactly like a hang of the code under test.
    """
    log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 (closed by stop())
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    _logs[process.pid] = log
    return process


_logs: dict[int, IO[str]] = {}


def output(process: subprocess.Popen[str]) -> str:
    """What a process spawned by :func:`spawn` has written to stderr so far."""
    log = _logs[process.pid]
    log.seek(0)
    return log.read()


def start_relay(db_url: str, broker_url: str, *args: str) -> subprocess.Popen[str]:
    return spawn([OUTBOXER, "relay", "--db", db_url, "--broker", broker_url, *args])


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, wait for a clean exit, and return what the process logged."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(
            f"the process did not stop on SIGTERM:\n{output(process)[-3000:]}"
        ) from None
    err = output(process)
    _logs.pop(process.pid).close()
    assert process.returncode == 0, err[-3000:]
    return err


def payloads(deliveries: list[Delivery]) -> list[dict[str, Any]]:
    return [json.loads(d.body) for d in deliveries]


# Every database against every broker -------------------------------------------------------
