"""Hostile review, round 3: dead letters and their replay (docs/dead-letters.md).

Dead letters edited by hand, two operators replaying one letter at once, bulk replays and
purges racing the consumers that write new dead letters, and the command line's hostile
arguments.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import dead_letters as dead_letters_module
from outboxer.cli import main
from outboxer.errors import OutboxerError
from outboxer.message import Envelope
from outboxer.store.dead_letters import NewDeadLetter, insert_dead_letters
from outboxer.tables import dead_letter, outbox


def _park(
    engine: Engine,
    *,
    origin: str = "handler",
    consumer: str | None = "billing",
    handler: str | None = "charge",
    key: str | None = None,
    headers: dict[str, str] | None = None,
    count: int = 1,
) -> list[int]:
    """Park ``count`` dead letters the way the consumer or relay does; returns their ids."""
    rows = [
        NewDeadLetter(
            origin=origin,
            error_type="ValueError",
            error_message="card declined",
            attempts=3,
            envelope=Envelope(
                message_id=uuid.uuid4(),
                type="orders.placed",
                destination="orders",
                payload=b'{"order_id": %d}' % n,
                occurred_at=datetime.now(timezone.utc),
                key=key,
                headers=headers or {"tenant": "acme"},
            ),
            consumer=consumer,
            handler=handler,
        )
        for n in range(count)
    ]
    with engine.begin() as connection:
        before = connection.execute(select(func.max(dead_letter.c.id))).scalar() or 0
        insert_dead_letters(connection, rows)
        return list(
            connection.execute(
                select(dead_letter.c.id).where(dead_letter.c.id > before).order_by(dead_letter.c.id)
            ).scalars()
        )


def _outbox_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(outbox).order_by(outbox.c.id)).mappings())


def _edit(engine: Engine, dead_letter_id: int, **values: Any) -> None:
    """What an operator's hand-written UPDATE does to a dead letter."""
    with engine.begin() as connection:
        connection.execute(
            update(dead_letter).where(dead_letter.c.id == dead_letter_id).values(**values)
        )


# --- two operators, one letter ------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
def test_two_operators_replaying_one_letter_at_once_send_it_once(
    engine: Engine,
    Session: sessionmaker[OrmSession],
    monkeypatch: pytest.MonkeyPatch,
    keep: bool,
) -> None:
    [letter_id] = _park(engine)
    # Both operators have read the letter before either writes: the window a lock (or,
    # on SQLite, the write that claims the letter) must close.
    both_read = threading.Barrier(2)
    real = dead_letters_module.replay_envelope

    def slow_replay_envelope(letter: Any) -> Envelope:
        # Broken: the other one is waiting on the row lock (PostgreSQL, MariaDB).
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait(timeout=2)
        return real(letter)

    monkeypatch.setattr(dead_letters_module, "replay_envelope", slow_replay_envelope)
    outcomes: list[object] = []

    def operator() -> None:
        try:
            outcomes.append(outboxer.DeadLetters(Session).replay(letter_id, keep=keep))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)

    assert len(_outbox_rows(engine)) == 1
    sent = [o for o in outcomes if isinstance(o, uuid.UUID)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(sent) == 1 and len(refused) == 1, outcomes
    assert isinstance(refused[0], OutboxerError)
    assert f"dead letter {letter_id}" in str(refused[0]) or f"id {letter_id}" in str(refused[0])


# --- bulk commands racing the consumers -----------------------------------------------------


def test_replay_all_does_not_chase_the_dead_letters_its_own_replays_write(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    """The consumer runs while replay-all does, and the handler still fails: each replayed
    message comes back as a new dead letter. replay-all replays what matched when it
    started, not its own failures again and again."""
    _park(engine, count=3)
    written: list[int] = []

    def consumer_fails_again(done: int) -> None:
        if len(written) < 10:  # bounded: the unfixed code would loop for ever
            written.extend(_park(engine, count=done))

    replayed = outboxer.DeadLetters(Session).replay_all(
        handler="charge", batch_size=1, progress=consumer_fails_again
    )
    assert replayed == 3
    assert len(_outbox_rows(engine)) == 3
    assert len(outboxer.DeadLetters(Session).list()) == len(written)


def test_purge_deletes_only_what_matched_when_it_started(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    """The operator confirmed 'delete 3 dead letters': letters written while the purge runs
    (a consumer failing right now) are not deleted unseen."""
    _park(engine, count=3)
    written: list[int] = []

    def consumer_fails_meanwhile(done: int) -> None:
        if len(written) < 10:
            written.extend(_park(engine, count=1))

    deleted = outboxer.DeadLetters(Session).purge(batch_size=1, progress=consumer_fails_meanwhile)
    assert deleted == 3
    assert [d.id for d in outboxer.DeadLetters(Session).list()] == sorted(written, reverse=True)


def test_replay_all_skips_a_letter_it_cannot_replay_and_replays_the_others(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    _, broken, _ = _park(engine, count=3)
    _edit(engine, broken, consumer=None)  # a handler's letter that names no consumer
    skipped: list[tuple[int, str]] = []
    replayed = outboxer.DeadLetters(Session).replay_all(
        skipped=lambda letter_id, why: skipped.append((letter_id, why))
    )
    assert replayed == 2
    assert len(_outbox_rows(engine)) == 2
    assert [d.id for d in outboxer.DeadLetters(Session).list()] == [broken]
    [(skipped_id, why)] = skipped
    assert skipped_id == broken and "names no consumer" in why


# --- letters edited by hand -------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    ["{not json", "[1, 2]", '{"tenant": 1}', "null", '"text"'],
    ids=["invalid-json", "a-list", "a-number-value", "json-null", "a-string"],
)
def test_a_letter_whose_headers_were_edited_by_hand_is_listed_shown_and_refused_clearly(
    engine: Engine, Session: sessionmaker[OrmSession], stored: str
) -> None:
    good, edited = _park(engine, count=2)
    _edit(engine, edited, headers=stored)
    dead = outboxer.DeadLetters(Session)

    assert [d.id for d in dead.list()] == [edited, good]
    letter = dead.get(edited)
    assert stored in letter.headers.values()  # kept as it is, for the operator to see
    with pytest.raises(OutboxerError) as refused:
        dead.replay(edited)
    message = str(refused.value)
    assert f"dead letter {edited}" in message and "headers" in message
    assert "UPDATE outboxer_dead_letter" in message or "delete" in message
    assert _outbox_rows(engine) == []

    assert dead.replay_all() == 1  # the good one; the edited one stays
    assert [d.id for d in dead.list()] == [edited]

    runner = CliRunner()
    url = engine.url.render_as_string(hide_password=False)
    for args in (["list"], ["list", "--json"], ["show", str(edited)]):
        result = runner.invoke(main, ["dead-letter", *args, "--db", url])
        assert result.exit_code == 0, (args, result.output, result.exception)
    result = runner.invoke(main, ["dead-letter", "replay", str(edited), "--db", url])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"dead letter {edited}" in result.output


# --- the command line's hostile arguments ----------------------------------------------------


@pytest.mark.parametrize("command", ["show", "replay", "delete"])
@pytest.mark.parametrize("given", ["99999999999999999999", "-1", "0"])
def test_an_id_no_dead_letter_can_have_is_not_found_in_one_line(
    engine: Engine, command: str, given: str
) -> None:
    url = engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["dead-letter", command, "--db", url, "--", given])
    assert result.exit_code == 1, (result.output, result.exception)
    assert f"no dead letter has id {given}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_list_before_an_id_beyond_any_column_is_an_empty_page(engine: Engine) -> None:
    _park(engine)
    url = engine.url.render_as_string(hide_password=False)
    runner = CliRunner()
    result = runner.invoke(
        main, ["dead-letter", "list", "--db", url, "--before", "99999999999999999999"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "1 shown" in result.output


@pytest.mark.parametrize(
    "value",
    ["'; DROP TABLE outboxer_dead_letter; --", "chärge ✓ 🧾", "a\x00b", "\udcff"],
    ids=["sql", "unicode", "nul", "undecodable-argv"],
)
def test_filters_with_hostile_text_match_nothing_and_fail_nowhere(
    engine: Engine, Session: sessionmaker[OrmSession], value: str
) -> None:
    """Filters are bound values: SQL text is text. A NUL or an undecodable byte of the
    command line (Python hands it over as a lone surrogate) matches what the dead letter
    stored for it, instead of making the driver fail."""
    _park(engine)
    dead = outboxer.DeadLetters(Session)
    assert dead.list(handler=value) == []
    assert dead.matching(handler=value) == 0
    assert dead.replay_all(handler=value) == 0
    assert dead.purge(handler=value) == 0
    url = engine.url.render_as_string(hide_password=False)
    for args in (["list"], ["replay-all", "--yes"], ["purge", "--yes"]):
        result = CliRunner().invoke(
            main, ["dead-letter", *args, "--db", url, "--handler", value, "--consumer", value]
        )
        assert result.exit_code == 0, (args, result.output, result.exception)
        assert "no dead letters match" in result.output
    assert len(dead.list()) == 1


def test_a_filter_finds_the_letter_whose_stored_name_had_its_nul_replaced(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    _park(engine, handler="ch\x00rge")
    assert len(outboxer.DeadLetters(Session).list(handler="ch\x00rge")) == 1


SUBCOMMANDS = [
    ["list"],
    ["show", "1"],
    ["replay", "1"],
    ["replay-all", "--yes"],
    ["delete", "1"],
    ["purge", "--yes"],
]


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=lambda a: a[0])
def test_each_subcommand_explains_missing_tables_and_an_unreachable_database_in_one_line(
    pg_url: str, args: list[str]
) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["dead-letter", *args, "--db", pg_url])
    assert missing.exit_code == 6, (missing.output, missing.exception)
    assert "outboxer db upgrade" in missing.output
    assert len(missing.output.strip().splitlines()) == 1 and "Traceback" not in missing.output
    nowhere = "postgresql+psycopg://root@127.0.0.1:1/app?connect_timeout=2"
    unreachable = runner.invoke(main, ["dead-letter", *args, "--db", nowhere])
    assert unreachable.exit_code == 4, (unreachable.output, unreachable.exception)
    assert len(unreachable.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["list", "show", "replay", "replay-all", "delete", "purge"])
def test_each_subcommand_has_help(name: str) -> None:
    result = CliRunner().invoke(main, ["dead-letter", name, "--help"])
    assert result.exit_code == 0 and "--db" in result.output


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_replay_all_and_purge_interrupted_keep_whole_batches_and_finish_when_run_again(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    _park(engine, count=450)
    dead = outboxer.DeadLetters(Session)
    batches: list[int] = []

    def interrupt_after_two(done: int) -> None:
        batches.append(done)
        if len(batches) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dead.replay_all(batch_size=100, progress=interrupt_after_two)
    assert len(_outbox_rows(engine)) == 200 and dead.matching() == 250
    assert dead.replay_all(batch_size=100) == 250
    rows = _outbox_rows(engine)
    assert len(rows) == 450 and len({r["message_id"] for r in rows}) == 450

    _park(engine, count=1200)
    batches.clear()
    with pytest.raises(KeyboardInterrupt):
        dead.purge(batch_size=500, progress=interrupt_after_two)
    assert dead.matching() == 200
    assert dead.purge(batch_size=500) == 200 and dead.matching() == 0


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_twenty_thousand_dead_letters_are_listed_counted_and_purged_in_bounded_time(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    import time

    for _ in range(20):
        _park(engine, count=1000)
    dead = outboxer.DeadLetters(Session)
    started = time.monotonic()
    assert len(dead.list(limit=50)) == 50
    assert dead.matching(handler="charge") == 20_000
    assert dead.count() == {"handler": 20_000}
    batches: list[int] = []
    assert dead.purge(progress=batches.append) == 20_000
    assert batches == [500] * 40
    assert time.monotonic() - started < 60


def test_relay_dead_letters_of_one_key_are_replayed_in_their_order(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    ids = _park(engine, origin="relay", consumer=None, handler=None, key="order-7", count=5)
    _park(engine, origin="relay", consumer=None, handler=None, key="order-8", count=2)
    assert outboxer.DeadLetters(Session).replay_all(origin="relay", batch_size=2) == 7
    rows = [r for r in _outbox_rows(engine) if r["message_key"] == "order-7"]
    assert [r["payload"] for r in rows] == [b'{"order_id": %d}' % n for n in range(5)]
    assert {r["destination"] for r in rows} == {"orders"} and len(ids) == 5
    assert all(r["target_handler"] is None for r in rows)


def test_a_replay_that_fails_again_is_a_new_letter_with_a_fresh_attempt_count(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    from outboxer.testing import drain

    from .models import OrderPlaced

    runs: dict[str, int] = {"record": 0, "charge": 0}
    consumer = outboxer.Consumer(
        Session,
        name="billing",
        retry=outboxer.Retry(max_attempts=2, initial_delay=0.001, max_delay=0.001),
    )

    @consumer.handler(OrderPlaced)
    def record(event: OrderPlaced) -> None:
        runs["record"] += 1

    @consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced) -> None:
        runs["charge"] += 1
        raise ValueError("card declined")

    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1))  # type: ignore[attr-defined]
    drain(engine, [consumer], fail_fast=False)
    dead = outboxer.DeadLetters(Session)
    [first] = dead.list()
    assert (first.handler, first.attempts, runs) == ("charge", 2, {"record": 1, "charge": 2})

    dead.replay(first.id)
    drain(engine, [consumer], fail_fast=False)
    [second] = dead.list()
    assert second.message_id == first.message_id and second.first_failed_at > first.last_failed_at
    assert (second.handler, second.attempts) == ("charge", 2)
    assert runs == {"record": 1, "charge": 4}  # the other handler did not run again


def test_a_replay_to_a_handler_that_was_renamed_comes_back_naming_it(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    from outboxer.testing import drain

    from .models import OrderPlaced

    [letter_id] = _park(engine, consumer="billing", handler="charge")
    _edit(engine, letter_id, message_type="test.order_placed", destination="orders")
    consumer = outboxer.Consumer(Session, name="billing")

    @consumer.handler(OrderPlaced)
    def charge_card(event: OrderPlaced) -> None:  # was charge
        raise AssertionError("a replay for 'charge' must not run another handler")

    outboxer.DeadLetters(Session).replay(letter_id)
    drain(engine, [consumer], fail_fast=False)
    [back] = outboxer.DeadLetters(Session).list()
    assert back.origin == "consumer" and "charge" in back.error_message
    assert back.consumer == "billing"


def test_a_relay_letter_of_a_retry_lists_its_handler_without_a_consumer_of_none(
    engine: Engine,
) -> None:
    """The relay parks a retry it could not send with the envelope's handler
    ('billing:charge') and no consumer."""
    _park(engine, origin="relay", consumer=None, handler="billing:charge")
    url = engine.url.render_as_string(hide_password=False)
    runner = CliRunner(env={"COLUMNS": "200"})  # one line per row
    result = runner.invoke(main, ["dead-letter", "list", "--db", url])
    assert result.exit_code == 0, result.output
    assert "billing:charge" in result.output and "None" not in result.output


@pytest.mark.parametrize(
    "edit",
    [
        {"traceparent": "00-garbage-\x01-zz"},
        {"tracestate": "x" * 512},
        {"content_type": None},
        {"occurred_at": None},
        {"payload": b"\x00\xff not json"},
        {"message_key": "k\u2028\U0001f9fe"},
    ],
    ids=["traceparent", "tracestate", "content-type", "occurred-at", "payload", "key"],
)
def test_a_letter_with_other_columns_edited_by_hand_is_still_replayed(
    engine: Engine, Session: sessionmaker[OrmSession], edit: dict[str, Any]
) -> None:
    """What the envelope carries is the consumer's to judge (a payload that is not JSON
    comes back as a consumer dead letter saying so); the replay itself sends it."""
    [letter_id] = _park(engine)
    _edit(engine, letter_id, **edit)
    outboxer.DeadLetters(Session).replay(letter_id)
    [row] = _outbox_rows(engine)
    assert row["target_handler"] == "billing:charge" and row["destination"] == "billing"


def test_a_letter_whose_origin_was_edited_into_another_is_refused_clearly(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    [letter_id] = _park(engine)
    _edit(engine, letter_id, origin="bogus")
    with pytest.raises(OutboxerError, match=rf"dead letter {letter_id} has origin 'bogus'"):
        outboxer.DeadLetters(Session).replay(letter_id)
    assert _outbox_rows(engine) == []


def test_two_replay_alls_at_once_replay_each_letter_once(
    engine: Engine, Session: sessionmaker[OrmSession]
) -> None:
    _park(engine, count=300)
    counts: list[int] = []
    errors: list[BaseException] = []

    def operator() -> None:
        try:
            counts.append(outboxer.DeadLetters(Session).replay_all(batch_size=50))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads) and errors == []
    assert sum(counts) == 300
    rows = _outbox_rows(engine)
    assert len(rows) == 300 and len({r["message_id"] for r in rows}) == 300


@pytest.mark.parametrize("db_kind", ["mariadb"], indirect=True)
def test_replay_all_skips_a_letter_too_large_for_the_outbox_and_replays_the_others(
    engine: Engine, Session: sessionmaker[OrmSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_allowed_packet was lowered since the letter was parked."""
    from outboxer.store import outbox as outbox_store

    _, large, _ = _park(engine, count=3)
    _edit(engine, large, payload=b'"' + b"x" * 300_000 + b'"')
    with engine.connect() as connection:
        outbox_store.learn_statement_limit(connection)
    monkeypatch.setitem(outbox_store._packet_limits, engine, 400_000)
    skipped: list[tuple[int, str]] = []
    replayed = outboxer.DeadLetters(Session).replay_all(
        skipped=lambda letter_id, why: skipped.append((letter_id, why))
    )
    assert replayed == 2 and len(_outbox_rows(engine)) == 2
    assert [i for i, _ in skipped] == [large] and "max_allowed_packet" in skipped[0][1]
    assert [d.id for d in outboxer.DeadLetters(Session).list()] == [large]
