"""Second review of the inbox's dedup keys (commit e3ad18d): what two messages share an
inbox row, or what makes one run twice, on each database."""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import Any

import pytest

from outboxer import wire

from .test_review_dedup_keys import Line, SessionFactory, batch_size, headers_of

__all__ = ["batch_size"]


class Colour(str, enum.Enum):
    RED = "red"


@pytest.mark.parametrize("value", [Colour.RED], ids=["str-enum"])
def test_a_str_subclass_key_is_its_text_on_every_database(
    Session: SessionFactory, batch_size: int, value: object
) -> None:
    """A key that is a str subclass is the text it holds, as the same plain str is: the
    driver must not store another text (pymysql binds str() of a subclass: 'Colour.RED')."""
    line = Line(Session, lambda event: value if event["n"] == 1 else str.__str__(value), batch_size)  # type: ignore[arg-type]
    line.deliver([({"n": 1}, headers_of()), ({"n": 2}, headers_of())])
    assert line.seen == [1], "a str subclass and its plain text are one key"
    assert line.dead() == []


@pytest.mark.parametrize("value", ["NaN", "sNaN", "Infinity", "-Infinity"])
def test_a_decimal_that_is_no_number_is_refused_as_a_float_nan_is(
    Session: SessionFactory, value: str
) -> None:
    """Every message whose key is Decimal('NaN') would be one: the second is lost."""
    line = Line(Session, lambda event: Decimal(value))
    line.deliver([({"n": 1}, headers_of()), ({"n": 2}, headers_of())])
    assert line.seen == []
    assert len(line.dead()) == 2
    assert all(d.error_type == "outboxer.keys.DedupKeyError" for d in line.dead())


def test_a_tuple_holding_a_set_is_refused_as_a_set_is(Session: SessionFactory) -> None:
    """A set's text follows the process's hash seed: inside a tuple too."""
    line = Line(Session, lambda event: ("order", frozenset({"a", "b", "c"})))
    line.deliver([({"n": 1}, headers_of())])
    assert line.seen == []
    assert [d.error_type for d in line.dead()] == ["outboxer.keys.DedupKeyError"]


def test_a_tuple_of_parts_is_still_a_key(Session: SessionFactory) -> None:
    """A bool or a number inside a composite key tells keys apart: not refused."""
    line = Line(Session, lambda event: ("order-1", event["n"] == 1, 2.5))
    line.deliver([({"n": 1}, headers_of()), ({"n": 2}, headers_of()), ({"n": 1}, headers_of())])
    assert line.seen == [1, 2]
    assert line.dead() == []


def test_a_blank_broker_id_is_no_id_as_a_blank_header_or_body_id_is() -> None:
    """The default id (the broker's): ' ' made every message carrying it one uuid5, so all
    but the first were skipped as its duplicates."""
    from outboxer.adapters import take_in
    from outboxer.intake import Rejected

    from .test_adapter_intake import adapter

    spec = adapter(None)
    body = b'{"payment_id": "p", "amount_cents": 1}'
    for blank in (" ", "\t", "  \n"):
        result = take_in(body, {wire.BROKER_MESSAGE_ID: blank}, "webhooks", "payments", spec)
        assert isinstance(result, Rejected), repr(blank)
        assert result.dead_letter.error_type == "missing_message_id"


def test_one_batch_of_keyless_messages_duplicates_and_an_earlier_releases_row(
    Session: SessionFactory, batch_size: int
) -> None:
    """Keyless messages (one of them recorded by an earlier release), a redelivery of one
    in the same batch, and two messages of one key: each decided as alone."""
    from .test_review_dedup_keys import _recorded_before_the_upgrade

    line = Line(Session, "ref", batch_size)
    earlier, fresh, other = headers_of(), headers_of(), headers_of()
    _recorded_before_the_upgrade(Session, earlier)
    line.deliver(
        [
            ({"n": 1}, earlier),
            ({"n": 2}, fresh),
            ({"n": 2}, fresh),
            ({"n": 3}, other),
            ({"n": 4, "ref": "x"}, headers_of()),
            ({"n": 5, "ref": "x"}, headers_of()),
            ({"n": 6, "ref": fresh[wire.MESSAGE_ID]}, headers_of()),
        ]
    )
    assert sorted(line.seen) == [2, 3, 4, 6]
    line.deliver([({"n": 1}, earlier), ({"n": 2}, fresh), ({"n": 3}, other)])
    assert sorted(line.seen) == [2, 3, 4, 6]


def test_two_consumers_inserting_one_keyless_message_at_once_run_it_once(
    engine: Any, db_kind: str
) -> None:
    """The second insert of message-id:<id> waits for the first transaction, then finds it."""
    import threading
    from uuid import uuid4

    from outboxer.handlers import MESSAGE_ID_KEY
    from outboxer.store.inbox import record_inbox

    if db_kind == "sqlite":
        pytest.skip("one writer at a time")
    message_id = uuid4()
    row = {
        "handler": "review:pay",
        "dedup_key": MESSAGE_ID_KEY + str(message_id),
        "message_id": message_id,
        "message_type": "t",
    }
    answers: list[bool] = []
    first = engine.connect()
    transaction = first.begin()
    assert record_inbox(first, **row)

    def second() -> None:
        with engine.begin() as connection:
            answers.append(record_inbox(connection, **row))

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "the second insert did not wait for the first"
    transaction.commit()
    first.close()
    thread.join(10)
    assert answers == [False]


@pytest.mark.parametrize("value", [10**5000, ("order", -(10**5000))], ids=["int", "in-tuple"])
def test_an_int_too_long_for_text_is_refused_with_the_fix_at_once(
    Session: SessionFactory, value: object
) -> None:
    """Python refuses str() of an int of more than 4,300 digits (ValueError): that is no
    passing failure to retry, but a key the handler must give as text."""
    line = Line(Session, lambda event: value)
    line.deliver([({"n": 1}, headers_of())])
    assert line.seen == []
    [dead] = line.dead()
    assert dead.error_type == "outboxer.keys.DedupKeyError"
    assert "digits" in dead.error_message and "str" in dead.error_message
