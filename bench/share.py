"""Two relays under a steady load: each should carry at least 35% of the messages.

A producer process publishes at a steady rate over 100 keys, aiming above what the two
relays can carry (a key sticks to a relay only when that relay always has a batch of it in
flight, that is near its capacity); ``outboxer relay`` process A
starts first and has taken every key by the time process B starts. Over the following
``seconds`` the share of each is counted from its log (its "batch: ... sent" lines), and
the broker's queue is read back to check that the first delivery of every key's messages
came in publishing order.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pika
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .common import RABBITMQ_URL, Figure, engine_for, fresh_postgres
from .relay import OUTBOXER, _Rabbit

KEYS = 100


def _produce(
    Session: sessionmaker[outboxer.OutboxSession],
    exchange: str,
    rate: int,
    stop: threading.Event,
    published: list[int],
) -> None:
    """``rate`` messages a second in 20 transactions a second, round-robin over the keys."""
    per_transaction = max(1, rate // 20)
    n = 0
    started = time.monotonic()
    while not stop.is_set():
        with Session.begin() as session:
            for _ in range(per_transaction):
                session.publish(
                    {"key": n % KEYS, "seq": n // KEYS},
                    type="bench.share",
                    destination=exchange,
                    key=f"k{n % KEYS}",
                )
                n += 1
        published[0] = n
        ahead = n / rate - (time.monotonic() - started)
        if ahead > 0:
            stop.wait(ahead)


def _check_order(rabbit: _Rabbit, expected: int) -> tuple[int, int, int]:
    """Reads the sink queue: how many first deliveries came out of key order, how many
    published messages never came, and how many the queue held when the reading began.

    The reading waits up to 15 s for a next message. On 2026-11-30 a wait of 2 s ended it
    after about 9,500 of 504,800 messages in a full ``make bench`` run, and the rest were
    counted as missing or out of order in one figure; run alone minutes later, the same
    benchmark read all 523,200. The figures now say which, and how many the queue held."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    held = channel.queue_declare(rabbit.queue, passive=True).method.message_count
    last: dict[int, int] = {}
    seen: set[tuple[int, int]] = set()
    disorder = 0
    for _method, _properties, body in channel.consume(
        rabbit.queue, auto_ack=True, inactivity_timeout=15.0
    ):
        if body is None:
            break
        message = json.loads(body)
        key, seq = message["key"], message["seq"]
        if (key, seq) in seen:
            continue  # a duplicate (allowed)
        seen.add((key, seq))
        if seq < last.get(key, -1):
            disorder += 1
        last[key] = max(seq, last.get(key, -1))
        if len(seen) >= expected:
            break
    connection.close()
    return disorder, max(0, expected - len(seen)), held


class _RelayProcess:
    """An ``outboxer relay`` process, and the messages its log says it sent."""

    def __init__(self, url: str, name: str) -> None:
        self.sent = 0
        self.process = subprocess.Popen(
            [
                OUTBOXER,
                "relay",
                "--db",
                url,
                "--broker",
                RABBITMQ_URL,
                "--name",
                name,
                "--poll-interval",
                "0.2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            found = _SENT.search(line)
            if found:
                self.sent += int(found.group(1))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(10)


_SENT = re.compile(r"batch: \d+ claimed, (\d+) sent")


def run(seconds: float = 60.0, rate: int = 8000, quick: bool = False) -> list[Figure]:
    """Relays and producer are processes of their own (as in production)."""
    if quick:
        seconds = 15.0
    with fresh_postgres() as url:
        engine = engine_for(url)
        outboxer.create_all(engine)
        rabbit = _Rabbit()
        relays: list[_RelayProcess] = []
        producer = subprocess.Popen(
            [sys.executable, "-m", "bench.share", url, rabbit.exchange, str(rate)],
            cwd=str(Path(__file__).resolve().parent.parent),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            relays.append(_RelayProcess(url, "bench-A"))
            time.sleep(3.0)  # A takes every key before B exists
            relays.append(_RelayProcess(url, "bench-B"))
            time.sleep(3.0)  # B registers; both count two relays
            at_start = [r.sent for r in relays]
            time.sleep(seconds)
            carried = [r.sent - s for r, s in zip(relays, at_start, strict=True)]
            producer.send_signal(signal.SIGTERM)
            published = int(producer.communicate(timeout=30)[0].split()[-1])
            _wait_drained(engine)
        finally:
            if producer.poll() is None:
                producer.kill()
                producer.wait()
            for relay in relays:
                relay.stop()
        disorder, missing, held = _check_order(rabbit, published)
        rabbit.close()
        engine.dispose()
    total = sum(carried) or 1
    shares = [100.0 * c / total for c in carried]
    detail = (
        f"{total:,} messages in {seconds:.0f} s ({total / seconds:,.0f}/s, aiming at {rate:,}/s) "
        f"over {KEYS} keys; of {published:,} published, {disorder} out of key order and "
        f"{missing} missing (the queue held {held:,})"
    )
    return [
        Figure(
            f"relay {name} share of the messages",
            share,
            "%",
            ">= 35%",
            share >= 35 and disorder == 0 and missing == 0,
            detail,
        )
        for name, share in zip("AB", shares, strict=True)
    ]


def _wait_drained(engine: Engine, timeout: float = 120.0) -> None:
    """Until the outbox is empty."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            if not conn.execute(select(func.count()).select_from(outboxer.outbox)).scalar():
                break
            conn.rollback()
            time.sleep(0.2)


def _main() -> None:
    """The producer process: ``python -m bench.share URL EXCHANGE RATE`` until SIGTERM."""
    url, exchange, rate = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    engine = engine_for(url)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    published = [0]
    _produce(Session, exchange, rate, stop, published)
    engine.dispose()
    print(published[0], flush=True)


if __name__ == "__main__":
    _main()
