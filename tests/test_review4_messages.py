"""Hostile review, round 4: the fixes of round 3 to dead letters, SQS and envelope text.

Every test here was written first and seen failing on the code before its fix; the
failure each showed is in its docstring.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire
from outboxer.cli import main
from outboxer.message import Envelope
from outboxer.tables import outbox
from outboxer.transports.base import Outcome, SendResult
from outboxer.transports.sqs import SQSTransport, decode_attributes
from outboxer.transports.sqs.sending import Encoded, encode_message

from .test_review3_aws import slow_order_runs_once
from .test_review3_dead_letters import _edit, _outbox_rows, _park

SQS_REFUSES = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""What SQS refuses in a message body or a String attribute value (its documented set)."""


def _envelope(**fields: Any) -> Envelope:
    values: dict[str, Any] = {
        "message_id": uuid.uuid4(),
        "type": "orders.placed",
        "destination": "orders",
        "payload": b'{"order_id": 1}',
        "occurred_at": datetime.now(timezone.utc),
    }
    values.update(fields)
    return Envelope(**values)


# --- SQS: text SQS refuses in attribute values ------------------------------------------------

_NONCHARACTERS = _envelope(
    type="orders\ufffe.placed",
    key="order-\uffff",
    correlation_id="conv\uffff",
    headers={"note": "a\uffffb", "na\ufffeme": "v", "bell": "\x07\x7f\x85"},
)


def test_text_sqs_refuses_in_attributes_travels_escaped_and_arrives_whole() -> None:
    """Old code: ``AssertionError: outboxer-type: 'orders\\ufffe.placed'``: publish()
    accepts U+FFFE/U+FFFF (no control characters) and the transport sent them raw as
    attribute values (and raw in ``outboxer-headers``, JSON with ensure_ascii=False),
    which SQS refuses: the relay dead-lettered a message every RabbitMQ consumer gets."""
    for service in ("SQS", "SNS"):
        encoded = encode_message(_NONCHARACTERS, 1_048_576, service)
        assert isinstance(encoded, Encoded), encoded
        for name, attribute in encoded.attributes.items():
            value = attribute["StringValue"]
            assert not SQS_REFUSES.search(value), f"{name}: {value!r}"
        assert decode_attributes(encoded.attributes) == wire.encode_headers(_NONCHARACTERS)


@pytest.fixture
def transport(moto_endpoint: str) -> Iterator[SQSTransport]:
    made = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    yield made
    made.close()


def test_noncharacters_cross_sqs_and_decode_to_the_envelope_sent(transport: SQSTransport) -> None:
    """Old code: ``AssertionError: outboxer-type: {'StringValue': 'orders\\ufffe.placed',
    ...}`` in what the queue holds (moto takes what SQS refuses, so only the stored
    attributes show it)."""
    name = f"nonchar-{uuid.uuid4().hex[:10]}"
    url = transport.ensure_queue(name)
    sent = _envelope(
        destination=name,
        type=_NONCHARACTERS.type,
        key=_NONCHARACTERS.key,
        correlation_id=_NONCHARACTERS.correlation_id,
        headers=_NONCHARACTERS.headers,
    )
    [result] = transport.send([sent])
    assert result.outcome is Outcome.SENT, result
    [message] = transport.queue_client.receive_message(
        QueueUrl=url, MessageAttributeNames=["All"], WaitTimeSeconds=2
    )["Messages"]
    for attribute, value in message["MessageAttributes"].items():
        assert not SQS_REFUSES.search(value["StringValue"]), f"{attribute}: {value!r}"
    headers = decode_attributes(message["MessageAttributes"])
    received = wire.decode(message["Body"].encode(), headers, name)
    assert (received.type, received.key, received.correlation_id) == (
        sent.type,
        sent.key,
        sent.correlation_id,
    )
    assert received.headers == sent.headers


@pytest.mark.parametrize(
    "payload",
    ['{"note": "\uffff"}'.encode(), b"plain \x01 text", b"\x1b[2J"],
    ids=["nonchar", "control", "escape"],
)
def test_a_body_sqs_refuses_is_rejected_naming_the_character(payload: bytes) -> None:
    """Old code: ``AssertionError: Encoded(body=...)``: sent as it was, for SQS to refuse
    (moto takes it), instead of the message's own reason naming the character."""
    for service in ("SQS", "SNS"):
        result = encode_message(_envelope(payload=payload), 1_048_576, service)
        assert isinstance(result, SendResult), result
        assert result.outcome is Outcome.REJECTED
        assert "U+" in (result.error or "") and service in (result.error or "")


# --- dead letters -------------------------------------------------------------------------------


def test_list_before_an_id_below_any_column_is_an_empty_page(engine: Engine) -> None:
    """Old code (SQLite): ``OverflowError: Python int too large to convert to SQLite
    INTEGER``, a traceback from ``outboxer dead-letter list --before -99999999999999999999``
    (round 3 bounded only the ids above the column)."""
    _park(engine)
    dead = outboxer.DeadLetters(sessionmaker(engine))
    assert dead.list(before_id=-(2**64)) == []
    url = engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(
        main, ["dead-letter", "list", "--db", url, "--before", "-99999999999999999999"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "no dead letters match" in result.output


def test_a_letter_whose_handler_is_too_long_for_the_outbox_is_skipped_not_the_batch(
    engine: Engine,
) -> None:
    """Old code (PostgreSQL): ``sqlalchemy.exc.DataError: (psycopg.errors.StringDataRightTruncation)
    value too long for type character varying(255)``: a consumer column edited by hand
    (as the replay's own error message suggests) made consumer:handler longer than the
    outbox's target_handler, and the whole batch rolled back, every run: no letter of it
    was ever replayed. (SQLite stored it, for every consumer to refuse.)"""
    _, edited, _ = _park(engine, count=3)
    _edit(engine, edited, consumer="c" * 255)
    skipped: list[tuple[int, str]] = []
    dead = outboxer.DeadLetters(sessionmaker(engine))
    assert dead.replay_all(skipped=lambda i, why: skipped.append((i, why))) == 2
    assert [i for i, _ in skipped] == [edited]
    assert "255" in skipped[0][1] and "UPDATE outboxer_dead_letter" in skipped[0][1]
    assert [d.id for d in dead.list()] == [edited]
    assert len(_outbox_rows(engine)) == 2


def test_the_confirmation_counts_what_replay_all_does(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: ``replayed 3 of 2 dead letters`` (asked "replay 2 dead letters?"): the
    count was taken before the newest id, so a letter written in between was replayed
    without having been counted or confirmed."""
    _park(engine, count=2)
    counted = outboxer.DeadLetters.matching

    def count_then_a_letter_arrives(self: outboxer.DeadLetters, **kwargs: Any) -> int:
        total = counted(self, **kwargs)
        _park(engine)
        return total

    monkeypatch.setattr(outboxer.DeadLetters, "matching", count_then_a_letter_arrives)
    url = engine.url.render_as_string(hide_password=False)
    runner = CliRunner()
    result = runner.invoke(main, ["dead-letter", "replay-all", "--db", url, "--yes"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "replayed 2 of 2 dead letters" in result.output
    # The letter that arrived after the count waits; purge counts it, another arrives.
    result = runner.invoke(main, ["dead-letter", "purge", "--db", url, "--yes"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "deleted 1 dead letter\n" in result.output
    assert len(outboxer.DeadLetters(sessionmaker(engine)).list()) == 1
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(outbox)).scalar() == 2


# --- SQS: queues whose visibility timeout is tiny ----------------------------------------------


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
@pytest.mark.parametrize("visibility", ["0", "1"])
def test_a_queue_with_a_tiny_visibility_timeout_delivers_each_message_once(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    moto_endpoint: str,
    visibility: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Old code (0 s): ``ConsumerStats(messages=58, processed=1, duplicates=57, ...)``:
    the queue handed the message out again to every poll while its 2 s handler ran (and
    a redrive policy would have moved it to the queue's DLQ meanwhile); 1 s held."""
    caplog.set_level(logging.WARNING, logger="outboxer.transports.sqs")
    destination = f"tiny-{uuid.uuid4().hex[:10]}"
    transport = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    transport.queue_client.create_queue(
        QueueName=destination, Attributes={"VisibilityTimeout": visibility}
    )
    try:
        slow_order_runs_once(engine, Session, transport, destination, 2.0)
        warned = [
            r.getMessage() for r in caplog.records if "visibility timeout of 0" in r.getMessage()
        ]
        assert bool(warned) == (visibility == "0"), warned  # once per receiver
        assert all(destination in w and "VisibilityTimeout=30" in w for w in warned)
    finally:
        transport.close()


def test_a_queue_whose_visibility_timeout_cannot_be_read_is_named_with_the_fix(
    transport: SQSTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """Old code: ``assert []``: a missing sqs:GetQueueAttributes permission was logged at
    debug level only, and the consumer went on extending after its own extend_after (20 s),
    so on a queue with a 10 s timeout every slow message came back while it ran."""
    from botocore.exceptions import ClientError

    name = f"unreadable-{uuid.uuid4().hex[:10]}"
    transport.ensure_queue(name)

    def refuse(**_: Any) -> None:
        error = {"Error": {"Code": "AccessDenied", "Message": "not authorized"}}
        raise ClientError(error, "GetQueueAttributes")  # type: ignore[arg-type]

    client = transport.queue_client
    client.meta.events.register("before-call.sqs.GetQueueAttributes", refuse)
    caplog.set_level(logging.WARNING, logger="outboxer.transports.sqs")
    try:
        receiver = transport.receive_from([name])
        receiver.close()
    finally:
        client.meta.events.unregister("before-call.sqs.GetQueueAttributes", refuse)
    assert receiver.visibility_timeout is None
    warned = [r.getMessage() for r in caplog.records if "visibility timeout" in r.getMessage()]
    assert len(warned) == 1, warned
    assert name in warned[0] and "AccessDenied" in warned[0]
    assert "sqs:GetQueueAttributes" in warned[0] and "visibility_timeout=" in warned[0]
    assert "\n" not in warned[0]
