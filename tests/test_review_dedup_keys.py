"""Review of the inbox's dedup keys: what two messages share an inbox row, on each database.

A message skipped as a duplicate when it was never processed is lost, silently: the worst
outcome. Every case runs one message at a time (``consumer.process``) and, where a batch
could decide differently, batched (``batch_size=20``, deliveries injected in one go).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire
from outboxer.keys import FromBody, FromHeader
from outboxer.message import Envelope
from outboxer.store.inbox import record_inbox
from outboxer.testing import MemoryBroker, MemoryTransport

from .test_consumer_hostile import good_headers

SessionFactory = sessionmaker[outboxer.OutboxSession]
ONCE = outboxer.Retry(max_attempts=1)
TYPE = "test.review.payment"
Key = str | Callable[[Any], object] | FromHeader


def headers_of(**extra: str) -> dict[str, str]:
    return good_headers(TYPE, **extra)


class Line:
    """One consumer with one handler of dicts that records the ``n`` of each event it runs."""

    def __init__(self, Session: SessionFactory, key: Key, batch_size: int = 1) -> None:
        self.Session = Session
        self.broker = MemoryBroker()
        self.transport = MemoryTransport(self.broker)
        self.consumer = outboxer.Consumer(Session, name="review", retry=ONCE, batch_size=batch_size)
        self.seen: list[Any] = []

        @self.consumer.handler(TYPE, destination="payments", dedup_key=key)
        def pay(event: dict[str, Any]) -> None:
            self.seen.append(event["n"])

    def process(self, body: dict[str, Any], headers: dict[str, str]) -> str:
        report = self.consumer.process(json.dumps(body).encode(), headers, destination="payments")
        return report.outcomes["pay"]

    def deliver(self, messages: list[tuple[dict[str, Any], dict[str, str]]]) -> None:
        """One message at a time with batch_size 1, else all in one batch."""
        if self.consumer.batch_size == 1:
            for body, headers in messages:
                self.process(body, headers)
            return
        self.transport.receiver(self.consumer.subscription())
        for body, headers in messages:
            self.broker.inject("review", json.dumps(body).encode(), headers, "payments")
        self.consumer.run(self.transport, once=True, idle_timeout=0.05)

    def dead(self) -> list[outboxer.DeadLetter]:
        return outboxer.DeadLetters(self.Session).list()


@pytest.fixture(params=[1, 20], ids=["one-at-a-time", "batched"])
def batch_size(request: pytest.FixtureRequest) -> int:
    return int(request.param)


# Case 2: a business key and a message id share the handler's inbox ------------------------


@pytest.mark.parametrize(
    "key",
    [outboxer.from_header("x-key"), lambda event: event.get("ref")],
    ids=["from_header", "function"],
)
@pytest.mark.parametrize("keyed_first", [True, False], ids=["keyed-first", "unkeyed-first"])
def test_a_business_key_equal_to_another_messages_id_does_not_skip_that_message(
    Session: SessionFactory, batch_size: int, key: Key, keyed_first: bool
) -> None:
    """Old code: the message without a key was recorded under its id; the other message,
    whose key was that id, was skipped as its duplicate (or the other way round)."""
    line = Line(Session, key, batch_size)
    unkeyed_headers = headers_of()
    unkeyed: tuple[dict[str, Any], dict[str, str]] = ({"n": 1}, unkeyed_headers)
    other_id = unkeyed_headers[wire.MESSAGE_ID]
    keyed: tuple[dict[str, Any], dict[str, str]]
    if isinstance(key, FromHeader):
        keyed = ({"n": 2}, headers_of(**{"x-key": other_id}))
    else:
        keyed = ({"n": 2, "ref": other_id}, headers_of())
    line.deliver([keyed, unkeyed] if keyed_first else [unkeyed, keyed])
    assert sorted(line.seen) == [1, 2]
    # Each is still its own duplicate.
    assert line.process(*unkeyed) == "duplicate"
    assert line.process(*keyed) == "duplicate"
    assert sorted(line.seen) == [1, 2]


def test_a_key_of_the_reserved_form_is_still_the_key_it_is(Session: SessionFactory) -> None:
    """A key that spells what outboxer stores for a message without a key is not that."""
    line = Line(Session, "ref")
    unkeyed_headers = headers_of()
    other_id = unkeyed_headers[wire.MESSAGE_ID]
    assert line.process({"n": 1}, unkeyed_headers) == "processed"
    for n, ref in enumerate((f"message-id:{other_id}", "message-id:", "message-id:x"), 2):
        assert line.process({"n": n, "ref": ref}, headers_of()) == "processed"
        assert line.process({"n": n, "ref": ref}, headers_of()) == "duplicate"
    assert line.seen == [1, 2, 3, 4]


# Empty and blank keys ---------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["", " ", "\t \n"])
def test_an_empty_or_blank_key_is_no_key(
    Session: SessionFactory, batch_size: int, blank: str
) -> None:
    """Old code: ``""`` (and ``" "``) was the key of every message that had it: the second
    such message was skipped. A header's empty value was no key already; now any blank
    value, from a field, a function or a header, deduplicates on the message id."""
    line = Line(Session, "ref", batch_size)
    first, second = headers_of(), headers_of()
    line.deliver([({"n": 1, "ref": blank}, first), ({"n": 2, "ref": blank}, second)])
    assert sorted(line.seen) == [1, 2]
    assert line.process({"n": 1, "ref": blank}, first) == "duplicate"
    assert line.process({"n": 2, "ref": blank}, second) == "duplicate"


def test_a_blank_header_is_no_key(Session: SessionFactory) -> None:
    line = Line(Session, outboxer.from_header("x-key"))
    assert line.process({"n": 1}, headers_of(**{"x-key": " "})) == "processed"
    assert line.process({"n": 2}, headers_of(**{"X-Key": " "})) == "processed"
    assert line.seen == [1, 2]


# Case 1: 1 and "1" ------------------------------------------------------------------------


def test_keys_compare_as_text_so_1_and_the_string_1_are_one_key(
    Session: SessionFactory, batch_size: int
) -> None:
    """Intended (docs/idempotency.md, "What a key is"): a key is text; an order 1 is one
    order whether a sender wrote it as a number or a string."""
    line = Line(Session, "ref", batch_size)
    line.deliver([({"n": 1, "ref": 1}, headers_of()), ({"n": 2, "ref": "1"}, headers_of())])
    assert line.seen == [1]
    assert line.process({"n": 3, "ref": "01"}, headers_of()) == "processed"  # not 1


# Values that are no identity ----------------------------------------------------------------


class Opaque:
    """No __str__ nor __repr__ of its own: its text holds its address, new at every run."""


@pytest.mark.parametrize(
    "value",
    [True, False, 1.0, math.nan, {"a": 1}, frozenset({"a"}), Opaque()],
    ids=["true", "false", "float", "nan", "dict", "set", "object"],
)
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_key_that_is_no_identity_is_dead_lettered_with_the_reason(
    Session: SessionFactory, batch_size: int, value: object
) -> None:
    """Old code: ``True`` (or NaN: ``"nan"``) was the key of every message, so all but the
    first were skipped; an object's text changed at every run, so no redelivery was
    ever a duplicate. Now the handler gives up at once: a dead letter says why."""
    line = Line(Session, lambda event: value, batch_size)
    line.deliver([({"n": 1}, headers_of()), ({"n": 2}, headers_of())])
    assert line.seen == []
    letters = line.dead()
    assert len(letters) == 2
    for letter in letters:
        assert letter.handler == "pay" and letter.attempts == 1
        assert letter.error_type == "outboxer.keys.DedupKeyError"
        assert "dedup key" in (letter.error_message or ""), letter.error_message
        assert "not retryable" in (letter.error_message or "")


@pytest.mark.parametrize(
    "value, text",
    [(7, "7"), ("7", "7"), (b"7", "b'7'"), (("a", 1), "('a', 1)")],
    ids=["int", "str", "bytes", "tuple"],
)
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_other_values_are_keys_by_their_text(
    Session: SessionFactory, value: object, text: str
) -> None:
    line = Line(Session, "ref")
    spec = line.consumer.registry.by_id["review:pay"]
    envelope = Envelope(
        message_id=outboxer.uuid7(),
        type=TYPE,
        destination="payments",
        payload=b"{}",
        occurred_at=datetime.now(timezone.utc),
    )
    assert spec.dedup_value(envelope, {"ref": value}) == text


# A key function that raises -----------------------------------------------------------------


def test_a_key_function_that_raises_is_the_handlers_failure_even_with_an_error_channel(
    Session: SessionFactory,
) -> None:
    """Old code: with an error channel, giving up computed the key again for the channel's
    inbox row, and its error escaped ``process()``: the delivery went back to the broker,
    to fail the same way at every redelivery."""
    failures: list[outboxer.Failure] = []
    consumer = outboxer.Consumer(Session, name="review", retry=ONCE)

    @consumer.handler(
        TYPE, destination="payments", dedup_key=lambda e: e["missing"], on_failure=failures.append
    )
    def pay(event: dict[str, Any]) -> None:
        raise AssertionError("not run: its key cannot be computed")

    headers = headers_of()
    report = consumer.process(b'{"n": 1}', headers, destination="payments")
    assert len(failures) == 1 and isinstance(failures[0].error, KeyError)
    assert report.outcomes["pay"] != "processed"
    without = outboxer.Consumer(Session, name="plain", retry=ONCE)
    without.handler(TYPE, destination="payments", dedup_key=lambda e: e["missing"])(pay)
    report = without.process(b'{"n": 1}', headers, destination="payments")
    assert report.outcomes == {"pay": "dead_lettered"}
    [letter] = outboxer.DeadLetters(Session).list(consumer="plain")
    assert letter.error_type == "KeyError"


# Several handlers, one key --------------------------------------------------------------------


def test_one_key_in_two_handlers_runs_both(Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="review", retry=ONCE)
    seen: list[str] = []

    @consumer.handler(TYPE, destination="payments", dedup_key="ref")
    def pay(event: dict[str, Any]) -> None:
        seen.append("pay")

    @consumer.handler(TYPE, destination="payments", dedup_key="ref")
    def notify(event: dict[str, Any]) -> None:
        seen.append("notify")

    body = json.dumps({"ref": "order-1"}).encode()
    first = consumer.process(body, headers_of(), destination="payments")
    second = consumer.process(body, headers_of(), destination="payments")
    assert first.outcomes == {"pay": "processed", "notify": "processed"}
    assert second.outcomes == {"pay": "duplicate", "notify": "duplicate"}
    assert seen == ["pay", "notify"]


# Hostile text ------------------------------------------------------------------------------------


def test_hostile_texts_are_distinct_keys_on_every_database(
    Session: SessionFactory, batch_size: int
) -> None:
    keys = [
        "k" * 255,
        "k" * 256,
        "a\x00b",
        "a\x00c",
        "\ud800",
        "\udc00",
        "sha256:" + "0" * 64,
        "ß",
        "ss",
        "é",
        "e\u0301",
        "A",
        "a",
    ]
    line = Line(Session, "ref", batch_size)
    line.deliver([({"n": n, "ref": key}, headers_of()) for n, key in enumerate(keys)])
    assert sorted(line.seen) == list(range(len(keys)))
    # ... and each is its own duplicate, whether it came alone or in a batch.
    line.deliver([({"n": 100 + n, "ref": key}, headers_of()) for n, key in enumerate(keys)])
    assert sorted(line.seen) == list(range(len(keys)))


# Inbound adapters' ids ------------------------------------------------------------------------


def test_an_adapters_id_that_is_blank_or_no_identity_is_no_id() -> None:
    """Old code: every message whose body id was ``true`` (or ``" "``) got one message id,
    so all but the first were duplicates; now it is ``missing_message_id``."""
    body_id = outboxer.from_body("id")
    for value in (True, False, 1.5, " ", "", None):
        assert body_id.value(json.dumps({"id": value}).encode()) is None, value
    assert body_id.value(b'{"id": 7}') == body_id.value(b'{"id": "7"}') == "7"
    header = outboxer.from_header("x-id")
    assert header.value({"X-ID": " \t"}) is None
    assert header.value({"x-id": " a "}) == " a "
    assert isinstance(body_id, FromBody)


# Upgrades: a message a keyed handler processed before keys got their own namespace -----


def _recorded_before_the_upgrade(Session: SessionFactory, headers: dict[str, str]) -> None:
    """The inbox row an earlier release wrote for a message without a key: its bare id."""
    message_id = headers[wire.MESSAGE_ID]
    with Session.begin() as session:
        assert record_inbox(
            session.connection(),
            handler="review:pay",
            dedup_key=message_id,
            message_id=UUID(message_id),
            message_type=TYPE,
        )


@pytest.mark.parametrize(
    "key", [outboxer.from_header("x-key"), "ref"], ids=["from_header", "field"]
)
def test_a_message_processed_before_the_upgrade_is_still_a_duplicate_after_it(
    Session: SessionFactory, batch_size: int, key: Key
) -> None:
    """A redelivery across a rolling upgrade: the earlier release recorded the message
    without a key under its bare id; this release must find that row, or run it twice."""
    line = Line(Session, key, batch_size)
    assert [spec.id for spec in line.consumer.handlers] == ["review:pay"]
    redelivered = headers_of()
    _recorded_before_the_upgrade(Session, redelivered)
    line.deliver([({"n": 1}, redelivered)])
    assert line.seen == [], "processed twice across the upgrade"


def test_a_bare_id_row_of_another_message_still_does_not_skip_this_one(
    Session: SessionFactory, batch_size: int
) -> None:
    """The look for a row of the earlier release matches the message id too: a row whose
    key spells this message's id but which another message wrote is no duplicate."""
    line = Line(Session, "ref", batch_size)
    unkeyed = headers_of()
    line.deliver([({"n": 2, "ref": unkeyed[wire.MESSAGE_ID]}, headers_of())])
    line.deliver([({"n": 1}, unkeyed)])
    assert sorted(line.seen) == [1, 2]


def test_a_handler_without_a_transaction_finds_the_earlier_releases_row_too(
    Session: SessionFactory,
) -> None:
    consumer = outboxer.Consumer(Session, name="review", retry=ONCE)
    seen: list[int] = []

    @consumer.handler(TYPE, destination="payments", dedup_key="ref", transactional=False)
    def pay(event: dict[str, Any]) -> None:
        seen.append(event["n"])

    redelivered = headers_of()
    _recorded_before_the_upgrade(Session, redelivered)
    report = consumer.process(b'{"n": 1}', redelivered, destination="payments")
    assert report.outcomes["pay"] == "duplicate" and seen == []
    fresh = headers_of()
    consumer.process(b'{"n": 2}', fresh, destination="payments")
    assert consumer.process(b'{"n": 2}', fresh, destination="payments").outcomes["pay"] == (
        "duplicate"
    )
    assert seen == [2]
