"""Flat memory: the resident memory of a relay process over 1,000,000 messages and of a
consumer process over 100,000 (targets: growth below 20 MB each).

Each runs as a process of its own; its RSS is read after a warm-up (the first tenth of the
messages: connections, caches, the allocator's arenas) and at the end. The outbox is fed
in chunks by ``INSERT ... SELECT`` (the producer is not what is measured here) and the
broker queue keeps at most 20,000 messages (``x-max-length``), so neither the database nor
the shared broker grows with the count. The producer's side, 1,000,000 messages in one
transaction with the collector off, is ``python -m bench collector``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pika
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .common import RABBITMQ_URL, Figure, engine_for, fresh_postgres
from .consumer import EXCHANGE, BenchCharge, PaymentDue, _Base
from .relay import OUTBOXER, envelopes

LIMIT_MB = 20.0
CHUNK = 50_000
ROOT = Path(__file__).resolve().parent.parent

_FEED = text(
    "INSERT INTO outboxer_outbox (message_id, message_type, destination, message_key, "
    "payload, headers, occurred_at, available_at) "
    "SELECT gen_random_uuid(), 'bench.memory', :destination, 'k' || (g % 100), "
    "convert_to('{\"order_id\": ' || g || ', \"customer\": \"ada\"}', 'UTF8'), "
    '\'{"tenant": "acme"}\', now(), now() FROM generate_series(1, :n) AS g'
)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outboxer.outbox)).scalar_one())


def _bounded_sink(channel: BlockingChannel, exchange: str) -> str:
    queue = f"{exchange}-sink"
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(
        queue, durable=True, arguments={"x-max-length": 20_000, "x-overflow": "drop-head"}
    )
    channel.queue_bind(queue, exchange, "#")
    return queue


def _on_channel(work: Callable[[BlockingChannel], object]) -> None:
    """Run ``work`` on a short-lived channel (a connection left idle for minutes while
    the benchmark runs would miss its heartbeats and be closed by the broker)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        work(connection.channel())
    finally:
        connection.close()


def relay_rss(messages: int) -> Figure:
    exchange = f"bench-memory-{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}-sink"
    _on_channel(lambda channel: _bounded_sink(channel, exchange))
    with fresh_postgres() as url:
        engine = engine_for(url)
        outboxer.create_all(engine)
        relay = subprocess.Popen(
            [OUTBOXER, "relay", "--db", url, "--broker", RABBITMQ_URL, "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
        )
        fed, warm, started = 0, None, time.perf_counter()
        deadline = time.monotonic() + 900
        try:
            while True:
                pending = _pending(engine)
                sent = fed - pending
                if warm is None and sent >= messages // 10:
                    warm = (_rss_mb(relay.pid), sent)
                if fed >= messages and pending == 0:
                    break
                if fed < messages and pending < CHUNK:
                    n = min(CHUNK, messages - fed)
                    with engine.begin() as conn:
                        conn.execute(_FEED, {"destination": exchange, "n": n})
                    fed += n
                    continue
                if relay.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the relay stopped or stalled after {sent:,} messages")
                time.sleep(0.2)
            end = _rss_mb(relay.pid)
            elapsed = time.perf_counter() - started
        finally:
            relay.terminate()
            relay.wait(60)
            engine.dispose()
            _on_channel(
                lambda channel: (channel.queue_delete(queue), channel.exchange_delete(exchange))
            )
    assert warm is not None
    growth = end - warm[0]
    return Figure(
        f"relay process: RSS growth over {messages:,} messages",
        growth,
        "MB",
        f"< {LIMIT_MB:.0f} MB",
        growth < LIMIT_MB,
        f"{warm[0]:.0f} MB after {warm[1]:,}, {end:.0f} MB at the end; {elapsed:.0f} s "
        f"({messages / elapsed:,.0f} msg/s)",
    )


def consumer_rss(messages: int) -> Figure:
    with fresh_postgres() as url:
        worker = subprocess.Popen(
            [sys.executable, "-m", "bench.memory", url, str(messages)],
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        ready = worker.stdout.readline()  # the consumer's queue is declared
        if not ready:
            raise RuntimeError("the consumer process did not start")
        transport = outboxer.transport_from_url(RABBITMQ_URL)
        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        channel = connection.channel()
        queue, exchange = ready.split()
        started = time.perf_counter()
        try:
            sent = 0
            while sent < messages:
                depth = channel.queue_declare(queue, passive=True).method.message_count
                if depth > 10_000:
                    time.sleep(0.1)
                    continue
                n = min(2_000, messages - sent)
                batch = [
                    replace(e, type="bench.payment_due", payload=b'{"order_id": 1, "amount": 30}')
                    for e in envelopes(exchange, n)
                ]
                results = transport.send(batch)
                assert all(r.outcome.name == "SENT" for r in results), results[:1]
                sent += n
            output, _ = worker.communicate(timeout=900)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            transport.close()
            connection.close()
        elapsed = time.perf_counter() - started
    figures = json.loads(output.strip().splitlines()[-1])
    growth = figures["end"] - figures["warm"]
    return Figure(
        f"consumer process: RSS growth over {messages:,} messages",
        growth,
        "MB",
        f"< {LIMIT_MB:.0f} MB",
        growth < LIMIT_MB,
        f"{figures['warm']:.0f} MB after {messages // 10:,}, {figures['end']:.0f} MB at the end;"
        f" {elapsed:.0f} s ({messages / elapsed:,.0f} msg/s, default consumer settings)",
    )


def run(
    relay_messages: int = 1_000_000, consumer_messages: int = 100_000, quick: bool = False
) -> list[Figure]:
    if quick:
        relay_messages, consumer_messages = 100_000, 20_000
    return [relay_rss(relay_messages), consumer_rss(consumer_messages)]


def _consume_main() -> None:
    """The consumer process: ``python -m bench.memory URL N``; prints its queue's name
    once ready, then its RSS after a tenth of the messages and at the end, as JSON."""
    url, messages = sys.argv[1], int(sys.argv[2])
    engine = engine_for(url)
    outboxer.create_all(engine)
    _Base.metadata.create_all(engine)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    consumer = outboxer.Consumer(Session, name=f"bench-memory-{uuid.uuid4().hex[:6]}")
    done = threading.Event()
    count = [0]
    rss: dict[str, float] = {}

    @consumer.handler(PaymentDue)
    def charge(event: PaymentDue, session: object) -> None:
        session.add(BenchCharge(order_id=event.order_id))  # type: ignore[attr-defined]
        count[0] += 1
        if count[0] == messages // 10:
            rss["warm"] = _rss_mb_self()
        if count[0] >= messages:
            done.set()

    transport = outboxer.transport_from_url(RABBITMQ_URL)
    subscription = consumer.subscription()
    transport.receiver(subscription).close()
    print(subscription.queue, EXCHANGE, flush=True)
    runner = threading.Thread(target=consumer.run, args=(transport,))
    runner.start()
    done.wait(900)
    rss["end"] = _rss_mb_self()
    consumer.stop()
    runner.join(60)
    transport.close()
    print(json.dumps(rss), flush=True)


def _rss_mb_self() -> float:
    return _rss_mb(int(open("/proc/self/stat").read().split()[0]))


if __name__ == "__main__":
    _consume_main()
