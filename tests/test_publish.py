"""session.publish(): a message is stored if and only if its transaction commits."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.store import read_db_now

from .models import (
    Anything,
    Color,
    InvoiceCreated,
    NoDestination,
    Order,
    OrderPlaced,
    OrderShipped,
)

SessionFactory = sessionmaker[outboxer.OutboxSession]


def stored(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outboxer.outbox).order_by(outboxer.outbox.c.id)).mappings()
        return [dict(r) for r in rows]


def stored_ids(engine: Engine) -> list[uuid.UUID]:
    return [r["message_id"] for r in stored(engine)]


def test_commit_stores_exactly_the_published_messages_with_their_envelope(
    engine: Engine, Session: SessionFactory
) -> None:
    shipped = OrderShipped(
        order_id=7,
        shipped_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        tracking=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        total=Decimal("12.50"),
        color=Color.BLUE,
        lines=["a", "b"],
    )
    before = datetime.now(timezone.utc)
    with Session.begin() as session:
        session.add(Order(id=1))
        first = session.publish(OrderPlaced(order_id=1))
        second = session.publish(shipped, key="k-7", headers={"tenant": "acme"})

    rows = stored(engine)
    assert [r["message_id"] for r in rows] == [first, second]
    placed, ship = rows
    assert placed["message_type"] == "test.order_placed"
    assert placed["destination"] == "orders"
    assert placed["message_key"] == "1"  # from key="order_id", as a string
    assert json.loads(placed["payload"]) == {"order_id": 1, "customer": "ada"}
    assert placed["content_type"] == "application/json"
    assert placed["correlation_id"] is None  # a root message: its correlation id is its own id
    assert placed["causation_id"] is None
    assert placed["headers"] is None
    assert placed["attempts"] == 0 and placed["locked_by"] is None
    assert before - timedelta(seconds=1) <= placed["occurred_at"] <= datetime.now(timezone.utc)
    assert placed["occurred_at"].tzinfo is not None

    assert ship["message_key"] == "k-7"
    assert json.loads(ship["headers"]) == {"tenant": "acme"}
    assert json.loads(ship["payload"]) == {
        "order_id": 7,
        "shipped_at": "2026-01-02T03:04:05Z",
        "tracking": "12345678-1234-5678-1234-567812345678",
        "total": "12.50",
        "color": "blue",
        "lines": ["a", "b"],
    }
    assert first.version == 7 and second.version == 7 and first < second


def test_rollback_stores_nothing(engine: Engine, Session: SessionFactory) -> None:
    with pytest.raises(RuntimeError), Session.begin() as session:
        session.add(Order(id=1))
        session.publish(OrderPlaced(order_id=1))
        raise RuntimeError("boom")
    assert stored(engine) == []


def test_explicit_rollback_then_commit_stores_only_later_messages(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session() as session:
        session.publish(OrderPlaced(order_id=1))
        session.rollback()
        kept = session.publish(OrderPlaced(order_id=2))
        session.commit()
    assert stored_ids(engine) == [kept]


def test_session_closed_without_commit_stores_nothing(
    engine: Engine, Session: SessionFactory
) -> None:
    session = Session()
    session.add(Order(id=1))
    session.publish(OrderPlaced(order_id=1))
    session.close()
    with Session() as later:
        later.commit()
    assert stored(engine) == []


def test_rolled_back_savepoint_drops_only_its_own_messages(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        outer = session.publish(OrderPlaced(order_id=1))
        released = session.begin_nested()
        kept_inside = session.publish(OrderPlaced(order_id=2))
        rolled_back = session.begin_nested()
        session.publish(OrderPlaced(order_id=3))
        deepest = session.begin_nested()
        session.publish(OrderPlaced(order_id=4))
        deepest.commit()  # released into `rolled_back`, so it goes with it
        rolled_back.rollback()
        after = session.publish(OrderPlaced(order_id=5))
        released.commit()
        last = session.publish(OrderPlaced(order_id=6))
    assert stored_ids(engine) == [outer, kept_inside, after, last]


def test_rolled_back_outer_savepoint_drops_messages_of_released_inner_ones(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        kept = session.publish(OrderPlaced(order_id=1))
        with pytest.raises(ValueError), session.begin_nested():
            with session.begin_nested():
                session.publish(OrderPlaced(order_id=2))
            session.publish(OrderPlaced(order_id=3))
            raise ValueError("undo the outer savepoint")
    assert stored_ids(engine) == [kept]


def test_hundred_messages_in_one_transaction_are_one_insert_statement(
    engine: Engine, Session: SessionFactory
) -> None:
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with Session.begin() as session:
            for i in range(100):
                session.publish(OrderPlaced(order_id=i))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    outbox_writes = [s for s in statements if "outboxer_outbox" in s]
    assert len(outbox_writes) == 1
    assert "INSERT INTO outboxer_outbox" in outbox_writes[0]
    assert len(stored(engine)) == 100


def test_threads_with_their_own_sessions_never_mix_messages(
    engine: Engine, Session: SessionFactory
) -> None:
    threads_n, per_thread = 6, 20
    committed: dict[int, list[uuid.UUID]] = {}
    start = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            start.wait(timeout=10)
            with Session() as session:
                ids = [
                    session.publish(OrderPlaced(order_id=n * 1000 + i)) for i in range(per_thread)
                ]
                if n % 2:  # odd threads roll back: none of their messages may appear
                    session.rollback()
                else:
                    session.commit()
                    committed[n] = ids
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    rows = stored(engine)
    assert len(rows) == per_thread * (threads_n // 2)
    by_thread: dict[int, list[uuid.UUID]] = {}
    for row in rows:
        n = json.loads(row["payload"])["order_id"] // 1000
        by_thread.setdefault(n, []).append(row["message_id"])
    assert {n: sorted(ids) for n, ids in by_thread.items()} == {
        n: sorted(ids) for n, ids in committed.items()
    }


def test_delay_sets_the_earliest_send_time(engine: Engine, Session: SessionFactory) -> None:
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1))
        session.publish(OrderPlaced(order_id=2), delay=timedelta(minutes=10))
        session.publish(OrderPlaced(order_id=3), delay=30)
    with engine.connect() as conn:
        now = read_db_now(conn)
    now_row, ten_min, thirty_s = stored(engine)
    assert now_row["available_at"] <= now
    assert timedelta(minutes=9) < ten_min["available_at"] - now <= timedelta(minutes=10)
    assert timedelta(seconds=25) < thirty_s["available_at"] - now <= timedelta(seconds=30)


def test_dicts_and_pydantic_models_are_published(engine: Engine, Session: SessionFactory) -> None:
    with Session.begin() as session:
        session.publish({"sku": "x-1", "qty": 2}, type="stock.reserved", destination="stock")
        session.publish(InvoiceCreated(invoice_id=9, amount=Decimal("3.10")))
    reserved, invoice = stored(engine)
    assert (reserved["message_type"], reserved["destination"]) == ("stock.reserved", "stock")
    assert json.loads(reserved["payload"]) == {"sku": "x-1", "qty": 2}
    assert (invoice["message_type"], invoice["destination"]) == ("test.invoice_created", "billing")
    assert json.loads(invoice["payload"]) == {"invoice_id": 9, "amount": "3.10"}


def test_explicit_message_id_and_destination_override(
    engine: Engine, Session: SessionFactory
) -> None:
    chosen = uuid.uuid4()
    with Session.begin() as session:
        returned = session.publish(OrderPlaced(order_id=1), message_id=chosen, destination="audit")
    assert returned == chosen
    [row] = stored(engine)
    assert (row["message_id"], row["destination"]) == (chosen, "audit")


def test_core_connection_publish_follows_the_connection_transaction(engine: Engine) -> None:
    with engine.connect() as conn:
        kept = outboxer.publish(conn, OrderPlaced(order_id=1))
        savepoint = conn.begin_nested()
        outboxer.publish(conn, OrderPlaced(order_id=2))
        savepoint.rollback()
        conn.commit()
    with engine.connect() as conn:
        outboxer.publish(conn, OrderPlaced(order_id=3))
        conn.rollback()
    assert stored_ids(engine) == [kept]


# Errors in the caller -----------------------------------------------------------------


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_unserializable_payload_fails_in_the_caller_naming_the_field(
    engine: Engine, Session: SessionFactory
) -> None:
    class Money:
        pass

    with Session.begin() as session:
        with pytest.raises(outboxer.SerializationError, match=r"Anything\.value\['price'\]") as err:
            session.publish(Anything(value={"price": Money()}))
        assert "Money" in str(err.value)
        with pytest.raises(outboxer.SerializationError, match="order_id"):
            session.publish(OrderPlaced(order_id="not a number"))  # type: ignore[arg-type]
        with pytest.raises(outboxer.SerializationError, match=r"payload\['when'\]"):
            session.publish({"when": Money()}, type="t", destination="d")
        kept = session.publish(OrderPlaced(order_id=1))
    assert stored_ids(engine) == [kept]  # the failed calls stored nothing


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_publish_errors_say_what_is_wrong_and_how_to_fix_it(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session() as session:
        with pytest.raises(outboxer.MissingDestination, match="destination="):
            session.publish(NoDestination(n=1))
        with pytest.raises(outboxer.InvalidHeaders, match=r"'attempt'.*int.*must be strings"):
            session.publish(OrderPlaced(order_id=1), headers={"attempt": 3})  # type: ignore[dict-item]
        with pytest.raises(outboxer.InvalidHeaders, match="reserved"):
            session.publish(OrderPlaced(order_id=1), headers={"traceparent": "x"})
        with pytest.raises(outboxer.UnknownMessageType, match="explicit type"):
            session.publish({"a": 1}, destination="d")
        with pytest.raises(outboxer.UnknownMessageType, match=r"@outboxer\.message"):
            session.publish(object())
        with pytest.raises(outboxer.ConfigurationError, match="negative"):
            session.publish(OrderPlaced(order_id=1), delay=-1)
    with (
        PlainSession(engine) as plain,
        pytest.raises(outboxer.NotAnOutboxSession, match=r"class_=outboxer\.OutboxSession"),
    ):
        outboxer.publish(plain, OrderPlaced(order_id=1))


class Opaque:
    """Not serializable: pydantic has no schema for it."""


def test_message_decorator_rejects_what_it_cannot_serialize() -> None:
    with pytest.raises(outboxer.ConfigurationError, match="cannot serialize"):

        @outboxer.message("test.opaque", destination="x")
        @dataclass
        class HasOpaque:
            thing: Opaque

    with pytest.raises(outboxer.ConfigurationError, match="neither a dataclass nor a pydantic"):
        outboxer.message("test.plain", destination="x")(Opaque)

    with pytest.raises(outboxer.ConfigurationError, match="no field 'nope'"):

        @outboxer.message("test.badkey", destination="x", key="nope")
        @dataclass
        class BadKey:
            n: int

    with pytest.raises(outboxer.ConfigurationError, match="already registered"):

        @outboxer.message("test.order_placed", destination="x")
        @dataclass
        class Clash:
            n: int


def test_uuid7_ids_are_time_ordered_and_unique() -> None:
    ids = [outboxer.uuid7() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids[:100])
    ms = ids[0].int >> 80
    assert abs(ms - datetime.now(timezone.utc).timestamp() * 1000) < 60_000


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_postgresql_commit_notifies_relays_once_and_rollback_does_not(
    engine: Engine, Session: SessionFactory, db_url: str
) -> None:
    import psycopg

    from outboxer.store import NOTIFY_CHANNEL

    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with pytest.raises(RuntimeError), Session.begin() as session:
            session.publish(OrderPlaced(order_id=1))
            raise RuntimeError
        with Session.begin() as session:
            for i in range(5):
                session.publish(OrderPlaced(order_id=i))
        received = list(listener.notifies(timeout=2.0, stop_after=5))
    assert [n.channel for n in received] == [NOTIFY_CHANNEL]


def test_count_matches_after_many_transactions(engine: Engine, Session: SessionFactory) -> None:
    for i in range(1, 11):  # not 0: MariaDB treats id 0 as "generate one"
        with Session.begin() as session:
            session.add(Order(id=i))
            session.publish(OrderPlaced(order_id=i))
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outboxer.outbox)).scalar() == 10
        assert conn.execute(select(func.count()).select_from(Order)).scalar() == 10


# Keys and ids ---------------------------------------------------------------------------


def test_no_key_publishes_a_keyed_type_without_a_key(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1))  # the type's key
        session.publish(OrderPlaced(order_id=2), key=outboxer.NO_KEY, delay=3600)
        session.publish(OrderPlaced(order_id=3), key="explicit")
    assert [r["message_key"] for r in stored(engine)] == ["1", None, "explicit"]
    assert repr(outboxer.NO_KEY) == "outboxer.NO_KEY"


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_message_id_accepts_the_text_form_of_a_uuid(
    engine: Engine, Session: SessionFactory
) -> None:
    chosen = uuid.uuid4()
    with Session.begin() as session:
        returned = session.publish(OrderPlaced(order_id=1), message_id=str(chosen))
    assert returned == chosen and isinstance(returned, uuid.UUID)
    assert stored_ids(engine) == [chosen]


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"message_id": "not-a-uuid"}, r"message_id must be a uuid\.UUID or its text form"),
        ({"message_id": 12345}, r"message_id must be a uuid\.UUID or its text form"),
        ({"key": object()}, r"key must be a str or an int.*got object"),
        ({"key": True}, r"key must be a str or an int.*got bool"),
        ({"key": 1.5}, r"key must be a str or an int.*got float"),
        ({"key": b"bytes"}, r"key must be a str or an int.*got bytes"),
        ({"delay": float("nan")}, r"delay must be a finite number of seconds"),
        ({"delay": float("inf")}, r"delay must be a finite number of seconds"),
        ({"correlation_id": 42}, r"correlation_id must be a str"),
        ({"destination": "d" * 256}, r"destination is 256 characters long; the limit is 255"),
    ],
)
def test_publish_refuses_wrong_types_of_keys_ids_and_delays(
    engine: Engine, Session: SessionFactory, options: dict[str, Any], complaint: str
) -> None:
    with Session.begin() as session:
        with pytest.raises(outboxer.ConfigurationError, match=complaint):
            session.publish(OrderPlaced(order_id=1), **options)
        assert session.pending_messages() == []
    assert stored(engine) == []


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_int_keys_and_uuid_correlation_ids_are_stored_as_text(
    engine: Engine, Session: SessionFactory
) -> None:
    correlation = uuid.uuid4()
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1), key=42, correlation_id=correlation)  # type: ignore[arg-type]
    [row] = stored(engine)
    assert (row["message_key"], row["correlation_id"]) == ("42", str(correlation))


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_type_name_longer_than_the_column_is_refused_in_publish(
    engine: Engine, Session: SessionFactory
) -> None:
    with (
        Session.begin() as session,
        pytest.raises(
            outboxer.ConfigurationError, match="type is 300 characters long; the limit is 255"
        ),
    ):
        session.publish({"a": 1}, type="t" * 300, destination="d")
    assert stored(engine) == []
