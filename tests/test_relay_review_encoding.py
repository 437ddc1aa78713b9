"""Text that cannot be stored or sent: refused by ``publish()``, dead-lettered by the relay.

A lone surrogate (``"caf\\udce9"``, what ``bytes.decode(errors="surrogateescape")`` makes
of Latin-1 bytes) is a Python str but not Unicode text: it cannot be encoded as UTF-8, so
no database driver stores it as text and no broker carries it. A NUL character (U+0000)
is refused by PostgreSQL's text columns and by SQS. ``publish()`` used to accept both,
and the application's COMMIT failed instead (its domain writes lost with it); a header
holding one was stored (JSON-escaped), and the relay's encoder raised for the whole
batch, which the relay took for an outage of the destination: it never sent anything
there again. Now ``publish()`` refuses such text, naming the field; a row holding one
anyway (written by an older version or by hand) is that row's ``invalid_message`` dead
letter, and the rows beside it are sent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.errors import InvalidHeaders, MessageError
from outboxer.message import Envelope
from outboxer.transports import Delivery, Outcome

from .broker_cases import BrokerCase, MemoryCase
from .test_relay import dead_letters, outbox_rows

SessionFactory = sessionmaker[outboxer.OutboxSession]

SURROGATE = "caf\udce9"
NUL = "a\x00b"

# publish() arguments that cannot be stored or sent, the error, and a word it must say.
BAD_PUBLISH: dict[str, tuple[dict[str, Any], type[MessageError], str]] = {
    "header value with a lone surrogate": (
        {"headers": {"x-note": SURROGATE}},
        InvalidHeaders,
        "x-note",
    ),
    "header name with a lone surrogate": ({"headers": {SURROGATE: "x"}}, InvalidHeaders, "caf"),
    "header value with NUL": ({"headers": {"x-note": NUL}}, InvalidHeaders, "x-note"),
    "header name with NUL": ({"headers": {NUL: "x"}}, InvalidHeaders, "header"),
    "key with NUL": ({"key": NUL}, MessageError, "key"),
    "key with a lone surrogate": ({"key": SURROGATE}, MessageError, "key"),
    "correlation_id with NUL": ({"correlation_id": "c\x00"}, MessageError, "correlation_id"),
    "correlation_id with a lone surrogate": (
        {"correlation_id": SURROGATE},
        MessageError,
        "correlation_id",
    ),
    "type with NUL": ({"type": "t\x00"}, MessageError, "type"),
    "destination with a lone surrogate": ({"destination": SURROGATE}, MessageError, "destination"),
}


@pytest.mark.parametrize("case", list(BAD_PUBLISH))
@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_publish_refuses_text_that_cannot_be_stored_or_sent_and_the_commit_goes_through(
    engine: Engine, Session: SessionFactory, case: str
) -> None:
    arguments, error, names = BAD_PUBLISH[case]
    options: dict[str, Any] = {"type": "test.note", "destination": "notes", **arguments}
    with Session.begin() as session:
        with pytest.raises(error) as raised:
            session.publish({"n": 1}, **options)
        message = str(raised.value)
        assert names in message, message
        assert "UTF-8" in message or "NUL" in message, message
        message.encode()  # the error itself is printable anywhere
        session.publish({"n": 2}, type="test.note", destination="notes")
    # The application's transaction committed, with the good message only.
    assert [json.loads(r["payload"]) for r in outbox_rows(engine)] == [{"n": 2}]


def test_publish_still_takes_any_valid_unicode() -> None:
    from outboxer.publishing import build_message

    text = "café ☕ 𝄞 \u200b"
    header = text + "\t"  # a control character: refused in envelope text, not in headers
    built = build_message(
        {"n": 1},
        type="test.ünïcode",
        destination="nötes",
        key=text,
        headers={header: header},
        correlation_id=text,
    )
    assert built.envelope.headers == {header: header} and built.envelope.key == text


# The relay, on rows written by others ----------------------------------------------------------


@pytest.fixture(params=["memory", "rabbitmq", "sqs", "sns"])
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    if request.param == "memory":
        made: BrokerCase = MemoryCase()
    else:
        made = request.getfixturevalue(f"{request.param}_case")
    yield made
    if request.param == "memory":
        made.close()


def insert_row(engine: Engine, destination: str, key: str, headers: str, n: int) -> None:
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(
            insert(outboxer.outbox).values(
                message_id=uuid.uuid4(),
                message_type="test.note",
                destination=destination,
                message_key=key,
                payload=b'{"n": %d}' % n,
                headers=headers,
                occurred_at=now,
                available_at=now,
            )
        )


def receive(case: BrokerCase, receiver: Any, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    for _ in range(20):
        batch = receiver.receive(max_messages=10, timeout=0.5)
        for delivery in batch:
            delivery.ack()
        got.extend(batch)
        if len(got) >= count and not batch:
            break
    return got


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_row_whose_headers_cannot_be_encoded_is_dead_lettered_and_the_others_are_sent(
    engine: Engine, Session: SessionFactory, case: BrokerCase
) -> None:
    destination = case.new_destination()
    receiver = case.subscribe(destination)
    try:
        with Session.begin() as session:
            session.publish({"n": 1}, type="test.note", destination=destination, key="a")
        # JSON escapes: what an older outboxer stored for publish(headers={...: "caf\udce9"}).
        insert_row(engine, destination, "b", '{"x-note": "caf\\udce9"}', 2)
        insert_row(engine, destination, "c", '{"caf\\udce9": "x"}', 3)
        with Session.begin() as session:
            session.publish({"n": 4}, type="test.note", destination=destination, key="a")
        stats = outboxer.Relay(engine, case.transport).run(once=True)
        letters = dead_letters(engine)
        assert [(d["error_type"], json.loads(d["payload"])["n"]) for d in letters] == [
            ("invalid_message", 2),
            ("invalid_message", 3),
        ], f"stats: {stats}, rows left: {[r['last_error'] for r in outbox_rows(engine)]}"
        assert "x-note" in letters[0]["error_message"]
        assert all("UTF-8" in d["error_message"] for d in letters)
        assert (stats.sent, stats.dead_lettered) == (2, 2)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(outboxer.outbox)).scalar() == 0
        got = receive(case, receiver, 2)
        assert sorted(json.loads(d.body)["n"] for d in got) == [1, 4]
    finally:
        receiver.close()


@pytest.mark.parametrize("broker", ["rabbitmq", "sqs", "sns"])
def test_a_transport_rejects_only_the_message_it_cannot_encode(
    request: pytest.FixtureRequest, broker: str
) -> None:
    case: BrokerCase = request.getfixturevalue(f"{broker}_case")
    destination = case.new_destination()
    receiver = case.subscribe(destination)

    def envelope(n: int, headers: dict[str, str]) -> Envelope:
        return Envelope(
            message_id=uuid.uuid4(),
            type="test.note",
            destination=destination,
            payload=b'{"n": %d}' % n,
            occurred_at=datetime.now(timezone.utc),
            headers=headers,
        )

    try:
        results = case.transport.send(
            [
                envelope(1, {"x-ok": "fine"}),
                envelope(2, {"x-note": SURROGATE}),
                envelope(3, {SURROGATE: "x"}),
                envelope(4, {}),
            ]
        )
        assert [r.outcome for r in results] == [
            Outcome.SENT,
            Outcome.REJECTED,
            Outcome.REJECTED,
            Outcome.SENT,
        ], results
        assert {r.error_type for r in results[1:3]} == {"invalid_message"}
        assert results[1].error is not None and "x-note" in results[1].error
        got = receive(case, receiver, 2)
        assert sorted(json.loads(d.body)["n"] for d in got) == [1, 4]
    finally:
        receiver.close()
