"""Hostile input over the real wire: a running ``outboxer-inbox`` against generated messages.

Hypothesis generates AMQP properties and header tables (nesting, types, sizes, encodings)
and SQS attributes and bodies. Every generated message is made bad in at least one
definite way (no id, an id that is no UUID, a type nobody handles or that no column
holds, a body that is not the handler's type, a header table too deep to decode, an
``outboxer-handler`` naming another type's handler...), then mixed with good messages and
sent to an ``outboxer-inbox`` process on RabbitMQ or on SQS (moto). Invariants:

* the process stays alive;
* every bad message is dead-lettered exactly once, with a reason, within 10 s;
* every good message is processed exactly once, and none runs the wrong handler;
* the p99 latency of good messages stays under 2 s while the poison flows;
* the process's RSS stays flat.

Budget: ``OUTBOXER_FUZZ_EXAMPLES`` batches per broker of ``OUTBOXER_FUZZ_BATCH`` bad
messages each, with as many good ones: 2 x 25 by default (``make test``), 40 x 60 under
``HYPOTHESIS_PROFILE=chaos`` (``make chaos`` runs the tests marked ``long_profile`` so).
Each run prints its figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import Engine

import outboxer
from outboxer import wire

from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .broker_sqs import SQSCase
from .models import Effect
from .relaying import OUTBOXER, output, spawn, stop
from .services import RABBITMQ_URL, port_open, require

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "chaos"
EXAMPLES = int(os.environ.get("OUTBOXER_FUZZ_EXAMPLES", "40" if LONG else "2"))
BATCH = int(os.environ.get("OUTBOXER_FUZZ_BATCH", "60" if LONG else "25"))
DEAD_LETTER_WITHIN = 10.0
P99_LIMIT = 2.0
RSS_GROWTH_LIMIT_KB = 30 * 1024

pytestmark = [
    pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True),
    pytest.mark.long_profile,
]

ORDER = "test.order_placed"


# What can be wrong with a message: each makes it definitely bad ---------------------------

DEFECTS = [
    "no_id",
    "id_not_uuid",
    "unknown_type",
    "type_too_long",
    "type_control_chars",
    "body_not_json",
    "body_wrong_shape",
    "body_nested_deep",
    "occurred_at_garbage",
    "occurred_at_naive",
    "handler_of_other_type",
    "unknown_handler",
    "correlation_too_long",
    "deep_header_table",
]
SQS_ONLY = ["packed_headers_nested", "packed_headers_not_strings"]
AMQP_ONLY = ["deep_header_table", "timestamp_only_huge", "id_not_utf8"]

short_text = st.text(max_size=40)
user_header_names = st.text(
    alphabet=st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=12
).map(lambda name: f"x-{name}")


def amqp_values(depth: int = 3) -> st.SearchStrategy[Any]:
    """Header-table values pika can encode: text, bytes, ints, bools, decimals, nesting."""
    scalars = st.one_of(
        st.text(max_size=300),
        st.binary(max_size=64),
        st.integers(-(2**63), 2**63 - 1),
        st.booleans(),
        st.none(),
        st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(
                short_text.filter(lambda k: len(k.encode()) < 200), children, max_size=3
            ),
        ),
        max_leaves=12,
    )


noise_tables = st.dictionaries(user_header_names, amqp_values(), max_size=5)
sqs_noise = st.dictionaries(
    user_header_names,
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=60),
    max_size=4,
)


@dataclass
class Poison:
    defect: str
    noise: dict[str, Any]
    text: str
    number: int
    depth: int


def poison(defects: list[str]) -> st.SearchStrategy[Poison]:
    return st.builds(
        Poison,
        defect=st.sampled_from(defects),
        noise=noise_tables,
        text=st.text(max_size=80),
        number=st.integers(0, 2**64 - 1),
        depth=st.sampled_from([50, 1200, 3000, 6000]),
    )


def good_canonical(order_id: int, noise: dict[str, str] | None = None) -> dict[str, str]:
    headers = {
        wire.MESSAGE_ID: str(outboxer.uuid7()),
        wire.TYPE: ORDER,
        wire.OCCURRED_AT: datetime.now(timezone.utc).isoformat(),
        wire.CORRELATION_ID: f"fuzz-{order_id}",
        wire.CONTENT_TYPE: "application/json",
    }
    headers.update(noise or {})
    return headers


def nested_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def bad_message(p: Poison, nonce: str, consumer: str) -> tuple[bytes, dict[str, Any]]:
    """A body and canonical headers (values may be non-text on AMQP) with ``p.defect``."""
    headers: dict[str, Any] = {**good_canonical(0), **p.noise}
    body: bytes = json.dumps({"order_id": 1, "nonce": nonce}).encode()
    d = p.defect
    if d == "no_id":
        headers.pop(wire.MESSAGE_ID)
    elif d == "id_not_uuid":
        headers[wire.MESSAGE_ID] = "id-" + p.text
    elif d == "unknown_type":
        headers[wire.TYPE] = "fuzz.unknown." + p.text[:50]
    elif d == "type_too_long":
        headers[wire.TYPE] = "t" * 256 + p.text[:20]
    elif d == "type_control_chars":
        headers[wire.TYPE] = ORDER + "\x1b[2K\x00" + p.text[:20]
    elif d == "body_not_json":
        body = f"{nonce}:".encode() + p.text.encode("utf-8", "surrogatepass")
    elif d == "body_wrong_shape":
        # Not text: pydantic's lax mode reads numeric text ("5", " 7 ", "1_0") as an int.
        body = json.dumps({"order_id": {"text": p.text}, "nonce": nonce}).encode()
    elif d in ("body_nested_deep", "packed_headers_nested"):
        body = nonce.encode() + nested_list(p.depth)
        if d == "packed_headers_nested":
            body = json.dumps({"order_id": 1, "nonce": nonce}).encode()
            headers["outboxer-headers"] = "[" * (p.depth * 10)
    elif d == "packed_headers_not_strings":
        headers["outboxer-headers"] = json.dumps({"x-a": [p.number], "nonce": nonce})
    elif d == "occurred_at_garbage":
        headers[wire.OCCURRED_AT] = p.text + "not a time"
    elif d == "occurred_at_naive":
        headers[wire.OCCURRED_AT] = "2026-01-01T00:00:00"
    elif d == "handler_of_other_type":
        headers[wire.HANDLER] = f"{consumer}:admin"
        headers[wire.ATTEMPT] = str(p.number)
    elif d == "unknown_handler":
        headers[wire.HANDLER] = f"{consumer}:nobody-{p.text[:20]}"
    elif d == "correlation_too_long":
        headers[wire.CORRELATION_ID] = "c" * 256 + p.text
    elif d == "deep_header_table":
        table: dict[str, Any] = {}
        for _ in range(p.depth if p.depth > 1000 else 3000):
            table = {"a": table}
        headers["x-deep"] = table
    elif d == "timestamp_only_huge":
        headers.pop(wire.OCCURRED_AT)
        headers["__timestamp__"] = 2**62 + p.number % 2**62
    elif d == "id_not_utf8":
        headers[wire.MESSAGE_ID] = b"\xff\xfe" + p.text.encode()[:20]
    return body, headers


# The brokers ------------------------------------------------------------------------------


class Wire:
    """Sends raw messages to a consumer's queue."""

    defects: list[str]
    url: str

    def send(self, body: bytes, headers: dict[str, Any]) -> bool:
        """True if the broker took it (moto refuses some attribute shapes up front)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class RabbitWire(Wire):
    defects = [d for d in DEFECTS + AMQP_ONLY if d not in SQS_ONLY]
    url = RABBITMQ_URL

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        self.channel = self.connection.channel()

    def send(self, body: bytes, headers: dict[str, Any]) -> bool:
        headers = dict(headers)
        props: dict[str, Any] = {
            "message_id": headers.pop(wire.MESSAGE_ID, None),
            "type": headers.pop(wire.TYPE, None),
            "timestamp": headers.pop("__timestamp__", None),
        }
        for prop, name in (
            ("correlation_id", wire.CORRELATION_ID),
            ("content_type", wire.CONTENT_TYPE),
        ):
            value = headers.get(name)
            if isinstance(value, str) and len(value.encode()) <= 255:
                props[prop] = headers.pop(name)
        for prop in ("message_id", "type"):
            value = props[prop]
            if isinstance(value, str) and len(value.encode()) > 255:
                headers[wire.MESSAGE_ID if prop == "message_id" else wire.TYPE] = props.pop(prop)
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(40_000)  # pika's encoder recurses into nested tables
        try:
            self.channel.basic_publish(
                self.exchange, "fuzz", body, pika.BasicProperties(headers=headers, **props)
            )
        finally:
            sys.setrecursionlimit(limit)
        return True

    def close(self) -> None:
        self.connection.close()


class SQSWire(Wire):
    defects = [d for d in DEFECTS + SQS_ONLY if d != "deep_header_table"]

    def __init__(self, case: SQSCase, queue: str) -> None:
        self.client = case.transport.client
        self.queue_url = self.client.get_queue_url(QueueName=queue)["QueueUrl"]
        self.url = f"sqs://?region=us-east-1&endpoint_url={case.endpoint}"

    def send(self, body: bytes, headers: dict[str, Any]) -> bool:
        attributes: dict[str, Any] = {}
        packed: dict[str, str] = {}
        for name, value in headers.items():
            text = value if isinstance(value, str) else str(value)
            if name in wire.RESERVED or name == "outboxer-headers":
                if text:
                    attributes[name] = {"DataType": "String", "StringValue": text}
            else:
                packed[name] = text
        if packed and "outboxer-headers" not in attributes:
            attributes["outboxer-headers"] = {
                "DataType": "String",
                "StringValue": json.dumps(packed),
            }
        try:
            self.client.send_message(
                QueueUrl=self.queue_url,
                MessageBody=body.decode("utf-8", "replace") or " ",
                MessageAttributes=dict(list(attributes.items())[:10]),
            )
        except Exception:
            return False
        return True


@dataclass
class Run:
    """A running outboxer-inbox and what was sent to it."""

    engine: Engine
    Session: Any
    consumer: str
    process: Any
    wire: Wire
    sent_good: dict[str, float] = field(default_factory=dict)
    bad_nonces: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    dead_letter_waits: list[float] = field(default_factory=list)
    rss_start_kb: int = 0
    rss_end_kb: int = 0

    def effects(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(Effect.handler, Effect.message_key))]

    def letters(self) -> list[outboxer.DeadLetter]:
        return outboxer.DeadLetters(self.Session).list(consumer=self.consumer, limit=100_000)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(params=["rabbitmq", "sqs"])
def run(request: pytest.FixtureRequest, engine: Engine, Session: Any, db_url: str) -> Iterator[Run]:
    if request.param == "rabbitmq":
        require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
        case: Any = RabbitMQCase()
    else:
        case = SQSCase(request.getfixturevalue("moto_endpoint"))
    name = case.unique("fuzz")
    destination = case.new_destination()
    if isinstance(case, RabbitMQCase):
        case.queues.append(name)
        case.exchanges.append(name)
    env = {
        **os.environ,
        "APP_DB": db_url,
        "APP_DESTINATION": destination,
        "APP_CONSUMER": name,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    # tests.fuzz_app's subscription, declared here first
    subscription = outboxer.transports.Subscription(
        queue=name, bindings=[(destination, ORDER), (destination, "fuzz.admin")]
    )
    case.transport.receiver(subscription).close()
    the_wire: Wire = RabbitWire(name) if isinstance(case, RabbitMQCase) else SQSWire(case, name)
    command = [str(Path(OUTBOXER).parent / "outboxer-inbox"), "tests.fuzz_app:consumer"]
    process = spawn([*command, "--broker", the_wire.url, "--concurrency", "4"], env=env)
    current = Run(engine, Session, name, process, the_wire)
    try:
        # Warm up: the first good message also waits for the process to start.
        send_good(current, 0)
        assert wait(lambda: len(current.effects()) == 1, 60), output(process)[-3000:]
        current.sent_good.clear()
        current.rss_start_kb = current.rss_kb()
        yield current
    finally:
        log = stop(process) if process.poll() is None else output(process)
        the_wire.close()
        case.close()
        report(request.param, current, log)


def send_good(run: Run, order_id: int) -> None:
    body = json.dumps({"order_id": order_id, "customer": "fuzz"}).encode()
    headers = good_canonical(order_id)
    assert run.wire.send(body, headers)
    run.sent_good[str(order_id)] = time.time()


def report(broker: str, run: Run, log: str) -> None:
    latencies = sorted(run.latencies)
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0
    waits = max(run.dead_letter_waits, default=0.0)
    print(
        f"\nfuzz {broker} {datetime.now(timezone.utc):%Y-%m-%d}: {len(run.bad_nonces)} bad "
        f"dead-lettered once each (slowest batch settled in {waits:.1f} s), "
        f"{len(latencies)} good processed once each, p99 latency {p99:.3f} s, "
        f"max {max(latencies, default=0):.3f} s, RSS {run.rss_start_kb // 1024} -> "
        f"{run.rss_end_kb // 1024} MB"
    )


def test_a_running_consumer_survives_hostile_messages_over_the_wire(run: Run) -> None:
    counter = {"good": 1000, "bad": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(poison(run.wire.defects), min_size=BATCH, max_size=BATCH))
    def batch(poisons: list[Poison]) -> None:
        good_ids: list[str] = []
        nonces: list[str] = []
        for p in poisons:
            counter["bad"] += 1
            nonce = f"fz{uuid.uuid4().hex[:12]}"
            body, headers = bad_message(p, nonce, run.consumer)
            if run.wire.send(body, headers):
                nonces.append(nonce)
            counter["good"] += 1  # one good message after each bad one
            send_good(run, counter["good"])
            good_ids.append(str(counter["good"]))
        started = time.monotonic()

        def settled() -> bool:
            return len(run.letters()) >= len(run.bad_nonces) + len(nonces) and all(
                key in {k for _, k in run.effects()} for key in good_ids
            )

        assert wait(settled, DEAD_LETTER_WITHIN), (
            f"not settled within {DEAD_LETTER_WITHIN} s: {len(run.letters())} letters for "
            f"{len(run.bad_nonces) + len(nonces)} bad; log: {output(run.process)[-2000:]}"
        )
        run.dead_letter_waits.append(time.monotonic() - started)
        run.bad_nonces.extend(nonces)
        assert run.process.poll() is None, output(run.process)[-3000:]

    batch()
    time.sleep(1.0)  # a redelivery loop or a second dead letter would show up now
    assert run.process.poll() is None, "the consumer died"
    letters = run.letters()
    assert all(letter.error_message and letter.origin == "consumer" for letter in letters)
    assert len(letters) == len(run.bad_nonces), "a bad message was dead-lettered twice"
    quarantined = [letter for letter in letters if letter.error_type == "quarantined"]
    assert not quarantined, quarantined[0].error_message
    found = sorted(
        nonce
        for letter in letters
        for nonce in run.bad_nonces
        if nonce.encode() in letter.payload or nonce in json.dumps(letter.headers)
    )
    assert len(found) == len(set(found)), "a bad message was dead-lettered twice"
    effects = run.effects()
    keys = [key for _, key in effects]
    assert "admin" not in keys, "an outside publisher chose the handler"
    assert len(keys) == len(set(keys)), "a good message was processed twice"
    assert set(run.sent_good) <= set(keys), "a good message was not processed"
    handled_at = {key: float(handler[2:]) for handler, key in effects if handler.startswith("t=")}
    run.latencies = [handled_at[key] - sent for key, sent in run.sent_good.items()]
    latencies = sorted(run.latencies)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    assert p99 < P99_LIMIT, f"p99 latency {p99:.2f} s"
    run.rss_end_kb = run.rss_kb()
    growth = run.rss_end_kb - run.rss_start_kb
    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth // 1024} MB"
    assert "Traceback" not in output(run.process), output(run.process)[-3000:]
