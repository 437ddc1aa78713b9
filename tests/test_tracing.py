"""One trace per message journey: publish, relay, inbox, retry, dead letter, replay."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer import instrumentation, tracing, wire
from outboxer.cli import main as cli_main
from outboxer.tracing import OpenTelemetryInstrumentation

from .models import OrderPlaced
from .test_consumer import Harness


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.tracer = self.provider.get_tracer("test")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def metric_points(self) -> dict[str, list[Any]]:
        points: dict[str, list[Any]] = {}
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points


@pytest.fixture
def otel() -> Iterator[Otel]:
    setup = Otel()
    previous = instrumentation.install(
        OpenTelemetryInstrumentation(
            attribute_headers=["tenant"],
            tracer_provider=setup.provider,
            meter_provider=setup.meter_provider,
        )
    )
    yield setup
    instrumentation.install(previous)


@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)
def test_the_whole_journey_is_one_trace_through_retry_dead_letter_and_replay(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession], otel: Otel
) -> None:
    h = Harness(engine, Session)
    h.consumer.retry = outboxer.Retry(max_attempts=2, initial_delay=0.05, max_delay=0.05, jitter=0)
    broken = {"yes": True}

    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced) -> None:
        pass

    @h.consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced, session: Session) -> None:
        if broken["yes"]:
            raise ValueError("card declined")

    h.transport.receiver(h.consumer.subscription())
    with otel.tracer.start_as_current_span("POST /orders"):
        h.publish(
            OrderPlaced(order_id=1, customer="Ada Lovelace"),
            headers={"tenant": "acme", "token": "s3cr3t"},
        )
    h.deliver(until=lambda: bool(h.dead()))
    h.deliver()
    [letter] = h.dead()
    # What an operator pastes into Jaeger: the dead letter's trace is the request's.
    url = engine.url.render_as_string(hide_password=False)
    shown = CliRunner(env={"OUTBOXER_DB": url, "COLUMNS": "250"}).invoke(
        cli_main, ["dead-letter", "show", str(letter.id)]
    )
    assert shown.exit_code == 0, shown.output
    [request_span] = [s for s in otel.spans() if s.name == "POST /orders"]
    request_trace = format(request_span.context.trace_id, "032x")
    assert re.search(rf"trace id\s+{request_trace}", shown.output), shown.output
    broken["yes"] = False
    with otel.tracer.start_as_current_span("operator replays"):
        outboxer.DeadLetters(Session).replay(letter.id)
    h.deliver()

    spans = otel.spans()
    by_id = {s.context.span_id: s for s in spans}

    def one(name: str) -> ReadableSpan:
        found = [s for s in spans if s.name == name]
        assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
        return found[0]

    def named(name: str) -> list[ReadableSpan]:
        return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)

    def parent(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, f"{span.name} has no parent"
        return by_id[span.parent.span_id]

    request = one("POST /orders")
    trace_id = request.context.trace_id
    create = one("create orders")
    assert create.kind is SpanKind.PRODUCER and parent(create) is request
    assert create.attributes is not None
    assert create.attributes["messaging.operation.type"] == "create"
    assert create.attributes["messaging.destination.name"] == "orders"
    assert create.attributes["messaging.message.id"] == str(letter.message_id)
    assert create.attributes["outboxer.header.tenant"] == "acme"

    first_send, retry_send, replay_send = named("send orders") + named("send billing")
    process_first, process_retry, process_replay = named("process orders") + named(
        "process billing"
    )
    reserve_run = one("handle billing:reserve")
    charge_1, charge_2, charge_3 = named("handle billing:charge")
    retry = one("retry billing:charge")
    dead = one("dead_letter billing:charge")
    operator = one("operator replays")
    replay = one("replay billing:charge")

    # The relay's send spans are traces of their own, linked to each message's context.
    for send, linked in ((first_send, create), (retry_send, retry), (replay_send, replay)):
        assert send.kind is SpanKind.CLIENT
        assert send.context.trace_id != trace_id
        assert [link.context.span_id for link in send.links] == [linked.context.span_id]
        assert send.attributes is not None and send.attributes["messaging.system"] == "memory"
        assert send.attributes["messaging.operation.name"] == "send"

    # The journey: every hop is in the request's trace, parented as the story goes.
    assert parent(process_first) is create
    assert {parent(reserve_run), parent(charge_1)} == {process_first}
    assert parent(retry) is charge_1
    assert parent(process_retry) is retry
    assert parent(charge_2) is process_retry
    assert parent(dead) is charge_2
    assert parent(replay) is dead
    assert [link.context.span_id for link in replay.links] == [operator.context.span_id]
    assert operator.context.trace_id != trace_id
    assert parent(process_replay) is replay
    assert parent(charge_3) is process_replay
    journey = [
        create,
        process_first,
        reserve_run,
        charge_1,
        retry,
        process_retry,
        charge_2,
        dead,
        replay,
        process_replay,
        charge_3,
    ]
    assert {s.context.trace_id for s in journey} == {trace_id}

    for process in (process_first, process_retry, process_replay):
        assert process.kind is SpanKind.CONSUMER
        assert process.attributes is not None
        assert process.attributes["messaging.consumer.group.name"] == "billing"
        assert process.attributes["messaging.operation.type"] == "process"
    outcomes = [
        s.attributes["outboxer.handler.outcome"]
        for s in (reserve_run, charge_1, charge_2, charge_3)
    ]  # type: ignore[index]
    assert outcomes == ["processed", "retry_scheduled", "dead_lettered", "processed"]
    assert charge_1.status.status_code is StatusCode.ERROR
    assert charge_1.attributes is not None and charge_1.attributes["error.type"] == "ValueError"
    assert [s.attributes["outboxer.handler.attempt"] for s in (charge_1, charge_2, charge_3)] == [
        1,
        2,
        1,
    ]  # type: ignore[index]

    # Nothing from the payload or an unlisted header leaks into attributes. (Not hex: a
    # message id, a hex UUID, contained "ada" once in 12 runs or so.)
    values = [str(v) for s in spans for v in (s.attributes or {}).values()]
    assert not any("s3cr3t" in v or "Lovelace" in v for v in values)

    # Metrics.
    h.relay.figures()  # registered as the gauges' source
    points = otel.metric_points()
    sent = sum(
        p.value
        for p in points["messaging.client.sent.messages"]
        if "error.type" not in p.attributes
    )
    assert sent == 3
    assert {
        p.attributes["outboxer.handler.outcome"] for p in points["messaging.process.duration"]
    } == {"processed", "retry_scheduled", "dead_lettered"}
    assert sum(p.value for p in points["outboxer.outbox.backlog"]) == 0


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_duplicate_delivery_shows_in_its_span_and_the_duplicates_counter(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession], otel: Otel
) -> None:
    h = Harness(engine, Session)

    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced) -> None:
        pass

    h.publish(OrderPlaced(order_id=1))
    h.send()
    [message] = h.broker.published
    for _ in range(2):
        h.consumer.process(message.payload, wire.encode_headers(message), destination="orders")
    runs = [s for s in otel.spans() if s.name == "handle billing:reserve"]
    assert [s.attributes["outboxer.handler.outcome"] for s in runs] == ["processed", "duplicate"]  # type: ignore[index]
    [duplicates] = otel.metric_points()["outboxer.inbox.duplicates"]
    assert duplicates.value == 1


def test_without_an_sdk_publishing_stores_no_trace_context(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession]
) -> None:
    previous = tracing.install()  # the API alone: non-recording spans
    try:
        with Session.begin() as session:
            session.publish(OrderPlaced(order_id=1))
        with engine.connect() as conn:
            [traceparent] = conn.execute(select(outboxer.outbox.c.traceparent)).scalars().all()
        assert traceparent is None
    finally:
        instrumentation.install(previous)


# OTLP over HTTP to a real receiver ----------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    requests: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_the_relay_command_exports_its_spans_over_otlp_http(
    tmp_path: Path, otlp_receiver: ThreadingHTTPServer, otel: Otel
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    url = f"sqlite:///{tmp_path / 'otlp.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    with otel.tracer.start_as_current_span("checkout"), Session.begin() as session:
        for i in range(3):
            session.publish(OrderPlaced(order_id=i))
    [create] = [s for s in otel.spans() if s.name == "create orders"][:1]
    port = otlp_receiver.server_address[1]
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_SERVICE_NAME": "relay-under-test",
        "OTEL_METRICS_EXPORTER": "none",
    }
    outboxer_cli = Path(sys.executable).parent / "outboxer"
    done = subprocess.run(
        [str(outboxer_cli), "relay", "--db", url, "--broker", "memory://?discard=true", "--once"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while not otlp_receiver.requests and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    paths = {path for path, _ in otlp_receiver.requests}  # type: ignore[attr-defined]
    assert paths == {"/v1/traces"}
    received = []
    for _, body in otlp_receiver.requests:  # type: ignore[attr-defined]
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append((service["service.name"], scope_spans.scope.name, span))
    [(service, scope, send)] = received
    assert (service, scope, send.name) == ("relay-under-test", "outboxer", "send orders")
    assert send.kind == send.SPAN_KIND_CLIENT
    attributes = {a.key: a.value for a in send.attributes}
    assert attributes["messaging.batch.message_count"].int_value == 3
    assert attributes["messaging.system"].string_value == "memory"
    linked = {link.span_id.hex() for link in send.links}
    assert len(linked) == 3 and f"{create.context.span_id:016x}" in linked
    assert all(link.trace_id.hex() == f"{create.context.trace_id:032x}" for link in send.links)
    assert "batch: 3 claimed, 3 sent, 0 retried, 0 dead-lettered" in done.stderr


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_message_with_an_invalid_traceparent_is_processed_in_a_new_trace(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession], otel: Otel
) -> None:
    """Issue 9, defect 12 (old code: version ``ff`` was accepted, so the sender chose the
    trace id): an invalid traceparent starts a new trace."""
    sender = "0af7651916cd43dd8448eb211c80319c"
    consumer = outboxer.Consumer(Session, name="traced")

    @consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced) -> None:
        pass

    headers = {
        wire.MESSAGE_ID: str(outboxer.uuid7()),
        wire.TYPE: "test.order_placed",
        wire.OCCURRED_AT: "2026-01-01T00:00:00+00:00",
        wire.TRACEPARENT: f"ff-{sender}-b7ad6b7169203331-01",
    }
    report = consumer.process(b'{"order_id": 1}', headers, destination="orders")
    assert report.outcomes == {"reserve": "processed"}
    [process] = [span for span in otel.spans() if span.name.startswith("process")]
    assert process.parent is None
    assert f"{process.context.trace_id:032x}" != sender
