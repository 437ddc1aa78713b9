"""Relay benchmarks, each a ratio against a raw client measured in the same run.

* relay -> RabbitMQ rows/s over raw pika publishing the same messages without confirms
  (target >= 0.8x);
* relay -> SQS (moto) rows/s over raw ``send_message_batch`` at equal concurrency
  (target >= 0.9x);
* commit -> broker latency p50/p99 at low load, through a running ``outboxer relay``
  process woken by NOTIFY (target p50 <= 5 ms, p99 <= 30 ms).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pika
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire
from outboxer.cli import heap
from outboxer.ids import uuid7
from outboxer.message import Envelope
from outboxer.relay import relay_engine
from outboxer.transports.base import SendResult
from outboxer.transports.rabbitmq.amqp import _prepare
from outboxer.transports.rabbitmq.frames import body_frames, header_frame, publish_frame

from .common import RABBITMQ_URL, Figure, engine_for, fresh_postgres, median
from .cpu import Usage, usage

OUTBOXER = str(Path(sys.executable).parent / "outboxer")
PAYLOAD = '{{"order_id": {n}, "customer": "ada", "amount": "12.50", "lines": ["a", "b"]}}'


def publish_rows(Session: sessionmaker[outboxer.OutboxSession], destination: str, n: int) -> None:
    for start in range(0, n, 500):
        with Session.begin() as session:
            for i in range(start, min(start + 500, n)):
                session.publish(
                    json.loads(PAYLOAD.format(n=i)),
                    type="bench.order_placed",
                    destination=destination,
                    key=f"k{i % 100}",
                    headers={"tenant": "acme"},
                )


def envelopes(destination: str, n: int) -> list[Envelope]:
    now = datetime.now(timezone.utc)
    return [
        Envelope(
            message_id=uuid7(),
            type="bench.order_placed",
            destination=destination,
            payload=PAYLOAD.format(n=i).encode(),
            occurred_at=now,
            key=f"k{i % 100}",
            headers={"tenant": "acme"},
        )
        for i in range(n)
    ]


# RabbitMQ -----------------------------------------------------------------------------------


class _Rabbit:
    def __init__(self) -> None:
        self.exchange = f"bench-{uuid.uuid4().hex[:8]}"
        self.queue = f"{self.exchange}-sink"
        self.connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(self.exchange, "topic", durable=True)
        self.channel.queue_declare(self.queue, durable=True)
        self.channel.queue_bind(self.queue, self.exchange, "#")
        # A second channel in confirm mode for the ceiling (see ``ceiling``).
        self.confirming = self.connection.channel()
        self.published = self.confirmed = 0
        ready: list[object] = []
        self.confirming._impl.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=ready.append
        )
        while not ready:
            self.connection.process_data_events(0.01)

    def _on_confirm(self, frame: Any) -> None:
        if not isinstance(frame.method, pika.spec.Basic.Ack):
            raise RuntimeError(f"the broker refused a message: {frame.method}")
        self.confirmed = max(self.confirmed, frame.method.delivery_tag)

    def encoded(self, batch: list[Envelope]) -> bytes:
        """The frames the relay writes for ``batch`` (its encoder, its properties, mandatory),
        on the confirming channel, as one block of bytes."""
        channel = self.confirming.channel_number
        max_body = self.connection._impl.params.frame_max - 8
        parts: list[bytes] = []
        for index, envelope in enumerate(batch):
            prepared = _prepare(index, envelope, 1 << 27, 1 << 17)
            assert not isinstance(prepared, SendResult), prepared
            _, exchange, routing_key, body, properties, _ = prepared
            parts.append(publish_frame(channel, exchange, routing_key))
            parts.append(header_frame(channel, properties, len(body)))
            parts.extend(body_frames(channel, body, max_body))
        return b"".join(parts)

    def ceiling(self, data: bytes, count: int, timeout: float = 120.0) -> float:
        """The broker alone: ``count`` messages already encoded (``encoded``) written to the
        socket at once, with confirms, until all are confirmed and in the queue. No client
        work is timed, so no client can send outboxer's messages faster on this machine."""
        started = time.perf_counter()
        deadline = started + timeout
        self.connection._impl._adapter_emit_data(data)  # what the relay's publisher does
        self.published += count
        while self.confirmed < self.published:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.published - self.confirmed} messages not confirmed")
            self.connection.process_data_events(0.001)
        self.wait_for(count)
        return time.perf_counter() - started

    def purge(self) -> None:
        self.channel.queue_purge(self.queue)

    def depth(self) -> int:
        return int(self.channel.queue_declare(self.queue, passive=True).method.message_count)

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        """Until the broker holds ``count`` messages in the sink queue (a deadline poll)."""
        deadline = time.monotonic() + timeout
        while (depth := self.depth()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the queue holds {depth} of {count} messages after {timeout} s")
            time.sleep(0.002)

    def raw_publish(self, batch: list[Envelope], full: bool) -> float:
        """Plain pika without confirms, until the broker has every message; returns seconds.

        ``full``: the properties and header table outboxer sends; otherwise the minimal
        ones (``delivery_mode=2``, ``content_type``)."""
        publish = self.channel.basic_publish
        exchange = self.exchange
        minimal = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        started = time.perf_counter()
        for envelope in batch:
            if full:
                headers = wire.encode_headers(envelope)
                properties = pika.BasicProperties(
                    message_id=headers.pop(wire.MESSAGE_ID),
                    type=headers.pop(wire.TYPE),
                    correlation_id=headers.pop(wire.CORRELATION_ID),
                    content_type=headers.pop(wire.CONTENT_TYPE),
                    timestamp=int(envelope.occurred_at.timestamp()),
                    delivery_mode=2,
                    app_id="outboxer",
                    headers=headers,
                )
            else:
                properties = minimal
            publish(exchange, envelope.type, envelope.payload, properties)
        self.wait_for(len(batch))
        return time.perf_counter() - started

    def close(self) -> None:
        self.channel.queue_delete(self.queue)
        self.channel.exchange_delete(self.exchange)
        self.connection.close()


@dataclass
class RelayRig:
    """What a relay benchmark against RabbitMQ works with (:func:`relay_to_rabbitmq`)."""

    Session: sessionmaker[outboxer.OutboxSession]
    rabbit: _Rabbit
    relay: outboxer.Relay


@contextmanager
def relay_to_rabbitmq() -> Iterator[RelayRig]:
    """A fresh PostgreSQL database with outboxer's tables, an exchange and queue on
    RabbitMQ, and a relay connected as `outboxer relay` connects, in a process whose heap
    is settled as `outboxer relay` settles its own (outboxer.cli.heap); all closed
    afterwards."""
    with fresh_postgres() as url:
        engine = engine_for(url)
        outboxer.create_all(engine)
        rabbit = _Rabbit()
        transport = outboxer.transport_from_url(RABBITMQ_URL)
        relay_db = relay_engine(url)
        heap.settle()
        try:
            yield RelayRig(
                sessionmaker(engine, class_=outboxer.OutboxSession),
                rabbit,
                outboxer.Relay(relay_db, transport),
            )
        finally:
            transport.close()
            rabbit.close()
            relay_db.dispose()
            engine.dispose()


def run_rabbitmq(rounds: int = 5, messages: int = 10_000) -> list[Figure]:
    """Relay, raw pika (minimal properties), raw pika (outboxer's properties) and the
    broker's ceiling, each round in a rotating order, each timed until the queue holds
    every message, with the CPU each process spent."""
    names = ("relay", "minimal", "full", "ceiling")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[Usage]] = {name: [] for name in names}
    with relay_to_rabbitmq() as rig:
        Session, rabbit, relay = rig.Session, rig.rabbit, rig.relay
        publish_rows(Session, rabbit.exchange, 500)
        relay.run(once=True)  # warm-up: connections, declarations, statement caches
        rabbit.purge()
        for i in range(rounds):
            publish_rows(Session, rabbit.exchange, messages)
            batch = envelopes(rabbit.exchange, messages)
            encoded = rabbit.encoded(batch)

            def relay_round() -> float:
                started = time.perf_counter()
                stats = relay.run(once=True)
                assert stats.sent == messages, stats
                rabbit.wait_for(messages)
                return time.perf_counter() - started

            measures = {
                "relay": relay_round,
                "minimal": functools.partial(rabbit.raw_publish, batch, full=False),
                "full": functools.partial(rabbit.raw_publish, batch, full=True),
                "ceiling": functools.partial(rabbit.ceiling, encoded, messages),
            }
            order = list(names[i % 4 :] + names[: i % 4])
            for name in order:
                before = usage()
                seconds[name].append(measures[name]())
                cpu[name].append((usage() - before).per(messages))
                rabbit.purge()
    rate = {name: [messages / s for s in values] for name, values in seconds.items()}

    def ratio(a: str, b: str) -> list[float]:
        return [y / x for x, y in zip(seconds[a], seconds[b], strict=True)]

    def per_message(name: str) -> Usage:
        parts = cpu[name]
        return Usage(
            median([u.broker for u in parts]),
            median([u.postgres for u in parts]),
            median([u.client for u in parts]),
        )

    cpu_ratio = [r.total / m.total for r, m in zip(cpu["relay"], cpu["minimal"], strict=True)]
    over_minimal = ratio("relay", "minimal")
    detail = f"{rounds} rounds x {messages:,}, interleaved; until the queue holds them all"
    return [
        Figure(
            "relay (confirms, full envelope) / raw pika, minimal properties, no confirms",
            median(over_minimal),
            "x",
            ">= 0.8x",
            median(over_minimal) >= 0.8,
            f"{median(rate['relay']):,.0f} vs {median(rate['minimal']):,.0f} msg/s; {detail}",
            over_minimal,
        ),
        Figure(
            "relay / raw pika with outboxer's full properties, no confirms",
            median(ratio("relay", "full")),
            "x",
            "",
            True,
            f"{median(rate['relay']):,.0f} vs {median(rate['full']):,.0f} msg/s",
            ratio("relay", "full"),
        ),
        Figure(
            "raw pika full properties / raw pika minimal (the envelope's own cost)",
            median(ratio("full", "minimal")),
            "x",
            "",
            True,
            f"{median(rate['full']):,.0f} vs {median(rate['minimal']):,.0f} msg/s",
            ratio("full", "minimal"),
        ),
        Figure(
            "ceiling / raw pika minimal: the relay's frames, encoded beforehand, written at "
            "once with confirms (no client work)",
            median(ratio("ceiling", "minimal")),
            "x",
            "",
            True,
            f"{median(rate['ceiling']):,.0f} vs {median(rate['minimal']):,.0f} msg/s",
            ratio("ceiling", "minimal"),
        ),
        Figure(
            "CPU per message, relay / raw pika minimal (broker + PostgreSQL + client, all "
            "on this machine)",
            median(cpu_ratio),
            "x",
            "",
            True,
            "ms per 10,000 messages: "
            + "; ".join(f"{name}: {per_message(name).describe()}" for name in names),
            cpu_ratio,
        ),
    ]


# SQS ------------------------------------------------------------------------------------------


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's SQS server on a free port, with dummy credentials in the environment."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        import urllib.error
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _raw_sqs(client: Any, queue_url: str, batch: list[Envelope], concurrency: int) -> float:
    """Raw boto3 ``send_message_batch``, 10 per call, ``concurrency`` calls in flight."""

    def attributes(envelope: Envelope) -> dict[str, Any]:
        headers = wire.encode_headers(envelope)
        user = wire.user_headers(headers)
        chosen = {k: v for k, v in headers.items() if k not in user}
        chosen["outboxer-headers"] = json.dumps(user)
        return {k: {"DataType": "String", "StringValue": v} for k, v in chosen.items()}

    chunks = [batch[i : i + 10] for i in range(0, len(batch), 10)]

    def send(chunk: list[Envelope]) -> None:
        response = client.send_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {
                    "Id": str(i),
                    "MessageBody": e.payload.decode(),
                    "MessageAttributes": attributes(e),
                }
                for i, e in enumerate(chunk)
            ],
        )
        assert not response.get("Failed"), response["Failed"]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, chunks))
    return time.perf_counter() - started


def run_sqs(rounds: int = 5, messages: int = 400, concurrency: int = 8) -> list[Figure]:
    import boto3
    from botocore.config import Config

    with moto_server() as endpoint, fresh_postgres() as url:
        engine = engine_for(url)
        outboxer.create_all(engine)
        Session = sessionmaker(engine, class_=outboxer.OutboxSession)
        client = boto3.client(
            "sqs",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(max_pool_connections=concurrency * 2),
        )
        transport = outboxer.transport_from_url(
            f"sqs://?region=us-east-1&endpoint_url={endpoint}&concurrency={concurrency}"
        )
        relay = outboxer.Relay(engine, transport)
        ratios, relay_rates, raw_rates = [], [], []
        try:
            warm = f"bench-{uuid.uuid4().hex[:8]}"
            client.create_queue(QueueName=warm)
            publish_rows(Session, warm, 50)
            relay.run(once=True)
            for i in range(rounds):
                # moto slows as a queue fills: a fresh, small queue for every measurement.
                relay_queue = f"bench-relay-{uuid.uuid4().hex[:8]}"
                raw_queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
                client.create_queue(QueueName=relay_queue)
                raw_url = client.create_queue(QueueName=raw_queue)["QueueUrl"]
                publish_rows(Session, relay_queue, messages)
                batch = envelopes(raw_queue, messages)

                def relay_round() -> float:
                    started = time.perf_counter()
                    stats = relay.run(once=True)
                    assert stats.sent == messages, stats
                    return time.perf_counter() - started

                if i % 2:
                    raw_seconds = _raw_sqs(client, raw_url, batch, concurrency)
                    relay_seconds = relay_round()
                else:
                    relay_seconds = relay_round()
                    raw_seconds = _raw_sqs(client, raw_url, batch, concurrency)
                relay_rates.append(messages / relay_seconds)
                raw_rates.append(messages / raw_seconds)
                ratios.append(raw_seconds / relay_seconds)
        finally:
            transport.close()
            engine.dispose()
    ratio = median(ratios)
    return [
        Figure(
            "relay -> SQS / raw send_message_batch",
            ratio,
            "x",
            ">= 0.9x",
            ratio >= 0.9,
            f"{median(relay_rates):,.0f} vs {median(raw_rates):,.0f} msg/s (moto server, "
            f"{concurrency} calls in flight), {rounds} rounds x {messages}",
            ratios,
        )
    ]


# Latency --------------------------------------------------------------------------------------


def run_latency(messages: int = 300, interval: float = 0.02) -> list[Figure]:
    """Commit returns -> the message arrives at a consumer of the broker (an upper bound of
    commit -> broker-confirmed), with an ``outboxer relay`` process woken by NOTIFY."""
    with fresh_postgres() as url:
        engine = engine_for(url)
        outboxer.create_all(engine)
        Session = sessionmaker(engine, class_=outboxer.OutboxSession)
        rabbit = _Rabbit()
        committed: dict[str, float] = {}
        arrived: dict[str, float] = {}
        done = threading.Event()

        def consume() -> None:
            connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
            channel = connection.channel()
            for _method, properties, _body in channel.consume(
                rabbit.queue, auto_ack=True, inactivity_timeout=0.2
            ):
                if properties is not None:
                    arrived[properties.message_id] = time.perf_counter()
                if done.is_set() and len(arrived) >= len(committed):
                    break
            connection.close()

        relay = subprocess.Popen(
            [OUTBOXER, "relay", "--db", url, "--broker", RABBITMQ_URL, "--poll-interval", "5"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        try:
            time.sleep(2.0)  # the relay connects and goes idle on LISTEN
            for i in range(messages + 20):
                with Session.begin() as session:
                    message_id = session.publish(
                        {"n": i}, type="bench.latency", destination=rabbit.exchange
                    )
                if i >= 20:  # the first few warm up connections and caches
                    committed[str(message_id)] = time.perf_counter()
                time.sleep(interval)
            done.set()
            consumer.join(timeout=30)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(timeout=30)
            rabbit.close()
            engine.dispose()
    latencies = sorted((arrived[m] - t) * 1000 for m, t in committed.items() if m in arrived)
    lost = len(committed) - len(latencies)
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    detail = f"{len(latencies)} messages, one every {interval * 1000:.0f} ms, PostgreSQL NOTIFY"
    if lost:
        detail += f", {lost} NOT RECEIVED"
    return [
        Figure("commit -> broker latency p50", p50, "ms", "<= 5 ms", p50 <= 5 and not lost, detail),
        Figure(
            "commit -> broker latency p99", p99, "ms", "<= 30 ms", p99 <= 30 and not lost, detail
        ),
    ]
