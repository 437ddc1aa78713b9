"""A team's first production deployment and its upgrades, attacked: deploys that run
``outboxer db upgrade`` at the same moment, upgrades from every older revision with rows in
the tables (some leased by a relay), and the ``db`` commands' configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Connection, make_url

from outboxer import schema, tables
from outboxer.cli import main

from .services import SERVERS, require
from .test_migrations import schema_differences

OUTBOXER = str(Path(sys.executable).parent / "outboxer")
DEADLINE = 60.0


def start_upgrade(url: str) -> subprocess.Popen[str]:
    """``outboxer db upgrade`` as a deploy's init container runs it: a process of its own."""
    return subprocess.Popen(
        [OUTBOXER, "db", "upgrade"],
        env={**os.environ, "OUTBOXER_DB": url, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"outboxer db upgrade still running after {DEADLINE} s: {out} {err}")
    return process.returncode, out, err


def fresh_database(kind: str) -> Iterator[str]:
    """A new empty database on the ``kind`` server, dropped afterwards."""
    server = SERVERS[kind]
    require(kind, server.available, server.admin_url)
    url = server.create_database("outboxer_r")
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_db(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fresh_database(request.param)


def version_rows(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(f"SELECT version_num FROM {schema.VERSION_TABLE}"))
            return [row[0] for row in rows]
    finally:
        engine.dispose()


@pytest.mark.parametrize("start", [None, "0001", "0004"])
def test_deploys_upgrading_at_the_same_moment_all_succeed_and_one_migrates(
    server_db: str, start: str | None
) -> None:
    """Four replicas' init containers run ``outboxer db upgrade`` at once: every one exits 0,
    one says it upgraded, the others that they found the newest revision; the version table
    holds one row, the newest revision."""
    if start is not None:
        engine = create_engine(server_db)
        schema.upgrade(engine, start)
        engine.dispose()
    processes = [start_upgrade(server_db) for _ in range(4)]
    results = [finish(process) for process in processes]
    for returncode, _out, err in results:
        assert returncode == 0, err
        assert "Traceback" not in err, err
    outputs = [out for _, out, _ in results]
    upgraded = [out for out in outputs if f"to {schema.head()}" in out and "upgraded" in out]
    already = [out for out in outputs if f"already at revision {schema.head()}" in out]
    assert len(upgraded) == 1 and len(already) == 3, outputs
    assert version_rows(server_db) == [schema.head()]


@pytest.fixture
def pg_db() -> Iterator[str]:
    yield from fresh_database("postgresql")


def wait_until_blocked(connection: Connection, pid: int) -> None:
    """Until a backend of the database other than ``pid`` waits for a lock."""
    deadline = time.monotonic() + DEADLINE
    query = text(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE NOT l.granted AND a.datname = current_database() AND l.pid <> :pid"
    )
    while time.monotonic() < deadline:
        if connection.execute(query, {"pid": pid}).scalar():
            return
        time.sleep(0.05)  # a poll with a deadline, not a synchronisation
    pytest.fail("the second outboxer db upgrade never waited for the first")


def upgrade_behind_an_open_one(url: str) -> tuple[int, str, str]:
    """A deploy's migrations run in a transaction left open until a second ``outboxer db
    upgrade`` (a process) waits for a lock; then committed. The second's exit code and
    output."""
    engine = create_engine(url)
    watcher = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as first, watcher.connect() as watch:
            transaction = first.begin()
            schema.upgrade(first)  # in the caller's transaction: not committed yet
            pid = first.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            assert isinstance(pid, int)
            second = start_upgrade(url)
            try:
                wait_until_blocked(watch, pid)
            finally:
                transaction.commit()
            return finish(second)
    finally:
        engine.dispose()
        watcher.dispose()


def test_an_upgrade_that_starts_while_another_is_uncommitted_waits_for_it(pg_db: str) -> None:
    """On PostgreSQL the first deploy's migrations are one transaction: a second deploy
    that starts meanwhile waits for it, then finds the newest revision (no duplicate key
    in pg_type, no 'made by create_all')."""
    returncode, out, err = upgrade_behind_an_open_one(pg_db)
    assert returncode == 0, err
    assert f"already at revision {schema.head()}" in out, out + err
    assert version_rows(pg_db) == [schema.head()]


KEYS = ["order-42 ", "order-42", "ключ-😀", "A"]
"""Inbox keys an older release wrote: trailing space, non-ASCII, case."""


def _fill_at(url: str, start: str) -> None:
    """Rows an older release left: pending, leased by a running relay, sent, dead, and
    inbox keys (written as that release did: plain strings)."""
    engine = create_engine(url)
    now = datetime.now(timezone.utc)
    base = {
        "message_type": "orders.placed",
        "destination": "orders",
        "message_key": "order-42",
        "payload": b'{"id": 42, "name": "\\u00e9"}\x00\xff',
        "headers": '{"x": "ü"}',
        "content_type": "application/json",
        "occurred_at": now,
    }
    try:
        with engine.begin() as connection:
            pending = {**base, "message_id": uuid.uuid4(), "available_at": now, "attempts": 0}
            leased = {
                **pending,
                "message_id": uuid.uuid4(),
                "attempts": 2,
                "locked_by": "old-relay:1",
                "locked_until": now + timedelta(minutes=5),
                "last_error": "broker said no",
                "first_failed_at": now,
            }
            for row in (pending, leased):  # one by one: a list takes the first row's keys
                connection.execute(tables.outbox.insert(), row)
            connection.execute(
                tables.sent.insert(),
                {**base, "id": 1, "message_id": uuid.uuid4(), "attempts": 1, "sent_at": now},
            )
            connection.execute(
                tables.dead_letter.insert(),
                {
                    **base,
                    "origin": "relay",
                    "message_id": uuid.uuid4(),
                    "error_type": "Unroutable",
                    "error_message": "no queue",
                    "attempts": 5,
                    "first_failed_at": now,
                    "last_failed_at": now,
                },
            )
            for key in KEYS:
                if key == "order-42" and start == "0001" and "mysql" in url:
                    continue  # one key with 'order-42 ' under utf8mb4_bin's PAD SPACE
                connection.execute(
                    text(
                        "INSERT INTO outboxer_inbox (handler, dedup_key, message_id, "
                        "message_type, processed_at) VALUES ('billing', :key, :id, 't', :at)"
                    ),
                    {
                        "key": key,
                        "id": uuid.uuid4().hex if "sqlite" in url else uuid.uuid4(),
                        "at": now,
                    },
                )
    finally:
        engine.dispose()


def _snapshot(url: str) -> dict[str, list[tuple[object, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table.name: sorted(
                    (tuple(row) for row in connection.execute(select(table))), key=repr
                )
                for table in (tables.outbox, tables.sent, tables.dead_letter, tables.inbox)
            }
    finally:
        engine.dispose()


@pytest.mark.parametrize("start", ["0001", "0002", "0003", "0004"])
def test_an_upgrade_from_every_older_revision_keeps_every_row_and_inbox_key(
    empty_db_url: str, start: str
) -> None:
    engine = create_engine(empty_db_url)
    schema.upgrade(engine, start)
    engine.dispose()
    _fill_at(empty_db_url, start)
    before = _snapshot(empty_db_url)

    result = CliRunner().invoke(main, ["db", "upgrade"], env={"OUTBOXER_DB": empty_db_url})
    assert result.exit_code == 0, result.output
    assert f"upgraded from {start} to {schema.head()}" in result.output

    assert _snapshot(empty_db_url) == before
    assert sum(len(rows) for rows in before.values()) >= 7
    engine = create_engine(empty_db_url)
    try:
        with engine.connect() as connection:
            for key in KEYS:  # the new release finds each key exactly, and no other
                found = connection.execute(
                    select(tables.inbox.c.dedup_key).where(
                        tables.inbox.c.handler == "billing", tables.inbox.c.dedup_key == key
                    )
                ).scalars()
                expected = (
                    []
                    if (key == "order-42" and start == "0001" and "mysql" in empty_db_url)
                    else [key]
                )
                assert list(found) == expected, key
            leased = connection.execute(
                select(tables.outbox.c.locked_by).where(tables.outbox.c.locked_by.is_not(None))
            ).scalars()
            assert list(leased) == ["old-relay:1"]
    finally:
        engine.dispose()
    assert schema_differences(empty_db_url) == []


def _upgrade_cli(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["db", "upgrade", *args], env={"OUTBOXER_DB": url})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def test_db_upgrade_refuses_in_one_line_what_it_cannot_start_from(empty_db_url: str) -> None:
    """Judged in the migrations' turn: tables made by create_all, a revision past
    --revision, a newer release's revision; each exit 1 and nothing changed."""
    engine = create_engine(empty_db_url)
    try:
        tables.create_all(engine)
        code, output = _upgrade_cli(empty_db_url)
        assert code == 1 and "made by outboxer.create_all" in output, output
        assert "outboxer db adopt" in output
        assert schema.current(engine) is None
        tables.drop_all(engine)

        schema.upgrade(engine)
        code, output = _upgrade_cli(empty_db_url, "--revision", "0003")
        assert code == 1 and f"at revision {schema.head()}, past 0003" in output, output

        with engine.begin() as connection:
            connection.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0099'"))
        code, output = _upgrade_cli(empty_db_url)
        assert code == 1 and "0099, newer than this outboxer knows" in output, output
        assert schema.current(engine) == "0099"
    finally:
        engine.dispose()


def test_db_upgrade_help_lists_the_revisions_it_takes() -> None:
    """--revision's help said "one of --help's", and --help listed none."""
    result = CliRunner().invoke(main, ["db", "upgrade", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for revision in schema.revisions():
        assert revision in result.output, result.output


@pytest.mark.parametrize("around", ["{}\n", " {}", "{} "])
def test_whitespace_around_outboxer_db_is_named_or_ignored(pg_db: str, around: str) -> None:
    """``OUTBOXER_DB`` from a Kubernetes secret file keeps the file's newline."""
    result = CliRunner().invoke(
        main, ["db", "current"], env={"OUTBOXER_DB": around.format(pg_db), "COLUMNS": "200"}
    )
    if result.exit_code != 0:
        assert result.exit_code == 3, result.output
        assert "OUTBOXER_DB" in result.output and "space" in result.output, result.output


def test_an_upgrade_that_waits_longer_than_lock_timeout_says_so_in_one_line(pg_db: str) -> None:
    """A role with ``lock_timeout`` (common in production) whose upgrade waits for another
    deploy's, or for a long transaction on the outboxer tables: one line naming the
    setting and the fix, exit 1, nothing changed; never a traceback."""
    engine = create_engine(pg_db)
    try:
        with engine.connect() as first:
            transaction = first.begin()
            schema.upgrade(first)
            result = CliRunner().invoke(
                main,
                ["db", "upgrade"],
                env={"OUTBOXER_DB": pg_db + "?options=-clock_timeout%3D200", "COLUMNS": "200"},
            )
            transaction.rollback()
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, result.output
        assert "lock_timeout" in errors[0] and "outboxer db upgrade" in errors[0], errors[0]
        assert schema.current(engine) is None
    finally:
        engine.dispose()


@pytest.fixture
def mariadb_db() -> Iterator[str]:
    yield from fresh_database("mariadb")


def test_a_mariadb_migration_that_waits_longer_than_lock_wait_timeout_says_so(
    mariadb_db: str,
) -> None:
    """0002 alters the inbox: a consumer's open transaction on it holds the ALTER back;
    with ``lock_wait_timeout`` the upgrade stops in one line, 0001 still recorded."""
    engine = create_engine(mariadb_db)
    try:
        schema.upgrade(engine, "0001")
        with engine.connect() as consumer:
            consumer.execute(text("SELECT count(*) FROM outboxer_inbox")).scalar()  # open
            result = CliRunner().invoke(
                main,
                ["db", "upgrade"],
                env={
                    "OUTBOXER_DB": mariadb_db + "?init_command=SET+lock_wait_timeout%3D1",
                    "COLUMNS": "200",
                },
            )
            consumer.rollback()
        assert isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "lock_wait_timeout" in errors[0], result.output
        assert schema.current(engine) == "0001"
        assert schema.upgrade(engine) == schema.head()  # once the transaction is over
    finally:
        engine.dispose()


READ_ONLY = {
    "postgresql": "?options=-cdefault_transaction_read_only%3Don",
    "mariadb": "?init_command=SET+SESSION+TRANSACTION+READ+ONLY",
}


@pytest.mark.parametrize("command", ["upgrade", "adopt"])
def test_db_commands_on_a_read_only_database_name_it_in_one_line(
    server_db: str, command: str
) -> None:
    """The first deploy points OUTBOXER_DB at a replica or a reader endpoint (read-only
    sessions): one line saying so and naming the variable to fix, exit 4 (the database's
    code: every command says the same, outboxer.diagnosis)."""
    kind = "postgresql" if server_db.startswith("postgresql") else "mariadb"
    if command == "adopt":
        engine = create_engine(server_db)
        tables.create_all(engine)
        engine.dispose()
    result = CliRunner().invoke(
        main,
        ["db", command],
        env={"OUTBOXER_DB": server_db + READ_ONLY[kind], "COLUMNS": "200"},
    )
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 4, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert "read-only" in errors[0] and "OUTBOXER_DB" in errors[0], errors[0]


def test_db_upgrade_with_a_search_path_to_no_schema_says_create_it(pg_db: str) -> None:
    """``?options=-csearch_path=app`` before anyone ran CREATE SCHEMA app: `db current`
    says to run `db upgrade`, which must then name the missing schema, not trace back."""
    url = pg_db + "?options=-csearch_path%3Dapp"
    result = CliRunner().invoke(main, ["db", "upgrade"], env={"OUTBOXER_DB": url})
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert "CREATE SCHEMA" in errors[0] and "search_path" in errors[0], errors[0]

    engine = create_engine(pg_db)
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA app"))
    engine.dispose()
    result = CliRunner().invoke(main, ["db", "upgrade"], env={"OUTBOXER_DB": url})
    assert result.exit_code == 0, result.output
    engine = create_engine(url)
    try:
        assert schema.current(engine) == schema.head()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT current_schema()")).scalar() == "app"
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", ["current", "upgrade", "adopt"])
def test_a_version_table_with_two_revisions_is_named_in_one_line(
    tmp_path: Path, command: str
) -> None:
    """A hand-run stamp left two rows in outboxer_alembic_version: every db command says
    which, and what to do, exit 1; never Alembic's traceback."""
    url = f"sqlite:///{tmp_path / 'two.sqlite'}"
    engine = create_engine(url)
    try:
        schema.upgrade(engine, "0004")
        with engine.begin() as connection:
            connection.execute(text(f"INSERT INTO {schema.VERSION_TABLE} VALUES ('0003')"))
    finally:
        engine.dispose()
    result = CliRunner().invoke(main, ["db", command], env={"OUTBOXER_DB": url})
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert "0003, 0004" in errors[0] and schema.VERSION_TABLE in errors[0], errors[0]


@pytest.mark.parametrize("start", ["0001", "0004"])
def test_an_upgrade_goes_on_beside_a_relay_claim_and_a_publish_in_flight(
    pg_db: str, start: str
) -> None:
    """docs/migrations.md: publishing and relaying go on while the migrations run. A relay's
    claim (an UPDATE of the lease, uncommitted) and a publisher's INSERT (uncommitted) do
    not hold the upgrade back: it finishes within a 2 s lock_timeout, and both commit."""
    engine = create_engine(pg_db)
    try:
        schema.upgrade(engine, start)
        _fill_at(pg_db, start)
        now = datetime.now(timezone.utc)
        with engine.connect() as relay, engine.connect() as publisher:
            relay.begin()
            claimed = relay.execute(
                tables.outbox.update()
                .where(tables.outbox.c.locked_by.is_(None))
                .values(locked_by="relay-in-flight", locked_until=now + timedelta(minutes=1))
            ).rowcount
            assert claimed == 1
            publisher.begin()
            publisher.execute(
                tables.outbox.insert(),
                {
                    "message_id": uuid.uuid4(),
                    "message_type": "t",
                    "destination": "d",
                    "payload": b"{}",
                    "content_type": "application/json",
                    "occurred_at": now,
                    "available_at": now,
                    "attempts": 0,
                },
            )
            result = CliRunner().invoke(
                main,
                ["db", "upgrade"],
                env={"OUTBOXER_DB": pg_db + "?options=-clock_timeout%3D2000"},
            )
            assert result.exit_code == 0, result.output
            relay.commit()
            publisher.commit()
        with engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(tables.outbox)).scalar() == 3
        assert schema.current(engine) == schema.head()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("driver", "command"),
    [
        ("sqlite+aiosqlite", ["db", "upgrade"]),
        ("sqlite+aiosqlite", ["status"]),
        ("postgresql+psycopg_async", ["db", "current"]),
        ("mysql+asyncmy", ["db", "current"]),
    ],
)
def test_an_asyncio_driver_url_in_outboxer_db_is_used_or_named(
    tmp_path: Path, driver: str, command: list[str]
) -> None:
    """An asyncio application's DATABASE_URL reused as OUTBOXER_DB: the commands are sync,
    so they must use the driver's sync sibling, or say which URL to give (exit 3)."""
    if driver.startswith("sqlite"):
        url = f"{driver}:///{tmp_path / 'a.sqlite'}"
    else:  # `db current` only, on the servers' shared databases: it changes nothing
        server = SERVERS["postgresql" if driver.startswith("postgresql") else "mariadb"]
        require(server.kind, server.available, server.admin_url)
        url = make_url(server.admin_url).set(drivername=driver).render_as_string(False)
    result = CliRunner().invoke(main, command, env={"OUTBOXER_DB": url, "COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in (0, 3, 6), result.output  # 6: status on an empty database
    if result.exit_code == 3:
        assert "OUTBOXER_DB" in result.output, result.output
