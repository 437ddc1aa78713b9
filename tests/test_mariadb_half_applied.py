"""A deploy killed half-way through a migration on MariaDB: the DDL already run is
committed (MariaDB commits each DDL statement), the revision is not recorded. The next
``outboxer db upgrade`` must finish the job, reach the newest revision and leave the
schema a clean upgrade leaves; what it cannot finish is named in one line."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine

from outboxer import schema
from outboxer.cli import main
from outboxer.errors import ConfigurationError

from .test_migrations import schema_differences
from .test_review3_deployment import (
    DEADLINE,
    OUTBOXER,
    finish,
    fresh_database,
    pg_db,
    start_upgrade,
    version_rows,
)

DDL_PER_REVISION = {"0001": 11, "0002": 1, "0003": 1, "0004": 1, "0005": 0, "0006": 0}
"""How many DDL statements each revision runs on MariaDB (test_every_revision_is_counted
keeps it true): each one may be the last a killed deploy committed."""

__all__ = ["pg_db"]

CASES = [
    (revision, ran) for revision, count in DDL_PER_REVISION.items() for ran in range(1, count + 1)
]


@pytest.fixture
def mariadb_db() -> Iterator[str]:
    yield from fresh_database("mariadb")


@pytest.fixture(scope="module")
def clean_shape() -> Iterator[dict[str, str]]:
    """The outboxer tables as a clean upgrade of an empty MariaDB database makes them."""
    for url in fresh_database("mariadb"):
        with engine_at(url) as engine:
            schema.upgrade(engine)
            yield shape(engine)


def shape(engine: Engine) -> dict[str, str]:
    """SHOW CREATE TABLE of every outboxer table (the next AUTO_INCREMENT left out)."""
    with engine.connect() as connection:
        names = sorted(
            n for n in inspect(connection).get_table_names() if n.startswith("outboxer_")
        )
        return {
            name: re.sub(
                r" AUTO_INCREMENT=\d+",
                "",
                connection.execute(text(f"SHOW CREATE TABLE {name}")).one()[1],
            )
            for name in names
        }


class Killed(BaseException):
    """The deploy's end: raised where the process would have been killed."""


def is_version_write(statement: str) -> bool:
    words = statement.lstrip().upper()
    return words.startswith(("INSERT", "UPDATE")) and schema.VERSION_TABLE.upper() in words


def is_ddl(statement: str) -> bool:
    words = statement.lstrip().upper()
    return (
        words.startswith(("CREATE", "ALTER", "DROP")) and schema.VERSION_TABLE.upper() not in words
    )


@contextmanager
def engine_at(url: str, **options: Any) -> Iterator[Engine]:
    """An engine on ``url``, disposed on the way out."""
    engine = create_engine(url, **options)
    try:
        yield engine
    finally:
        engine.dispose()


def run_killed(url: str, revision: str, ran: int, **engine_options: Any) -> None:
    """Upgrade to ``revision`` and stop dead once ``ran`` of its DDL statements ran: before
    the next DDL statement, or before the revision is recorded."""
    engine = create_engine(url, **engine_options)
    done: list[str] = []

    def before(conn: object, cursor: object, statement: str, *args: object) -> None:
        if (is_ddl(statement) or is_version_write(statement)) and len(done) == ran:
            raise Killed(statement)
        if is_ddl(statement):
            done.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        with pytest.raises(Killed):
            schema.upgrade(engine, revision)
    finally:
        engine.dispose()
    assert len(done) == ran


KILLER = """
import os, signal, sys
from sqlalchemy import create_engine, event
from outboxer import schema
from tests.test_mariadb_half_applied import is_ddl, is_version_write

url, revision, ran = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = create_engine(url)
done = []

@event.listens_for(engine, "before_cursor_execute")
def before(conn, cursor, statement, *args):
    if (is_ddl(statement) or is_version_write(statement)) and len(done) == ran:
        os.kill(os.getpid(), signal.SIGKILL)
    if is_ddl(statement):
        done.append(statement)

schema.upgrade(engine, revision)
"""


def kill_at(url: str, revision: str, ran: int) -> None:
    """As :func:`run_killed`, by SIGKILL of a process of its own (nothing rolled back by
    the dying process: what the database keeps is what a kill -9 leaves)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", KILLER, url, revision, str(ran)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def previous(revision: str) -> str | None:
    known = schema.revisions()
    at = known.index(revision)
    return known[at - 1] if at else None


def cli(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["db", *args], env={"OUTBOXER_DB": url, "COLUMNS": "400"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.output


def assert_clean_head(url: str, clean_shape: dict[str, str]) -> None:
    assert version_rows(url) == [schema.head()]
    assert schema_differences(url) == []
    with engine_at(url) as engine:
        assert shape(engine) == clean_shape


def test_every_revision_is_counted(mariadb_db: str) -> None:
    """DDL_PER_REVISION names every revision, with the DDL statements it runs on MariaDB."""
    engine = create_engine(mariadb_db)
    counted: dict[str, int] = {}
    ran: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if is_ddl(statement):
            ran.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for revision in schema.revisions():
            ran.clear()
            schema.upgrade(engine, revision)
            counted[revision] = len(ran)
    finally:
        engine.dispose()
    assert counted == DDL_PER_REVISION


@pytest.mark.parametrize(("revision", "ran"), CASES, ids=[f"{r}-after-{n}" for r, n in CASES])
def test_an_upgrade_killed_after_some_ddl_of_a_revision_is_finished_by_the_next(
    mariadb_db: str, clean_shape: dict[str, str], revision: str, ran: int
) -> None:
    before = previous(revision)
    if before is not None:
        with engine_at(mariadb_db) as engine:
            schema.upgrade(engine, before)
    run_killed(mariadb_db, revision, ran)
    assert version_rows(mariadb_db) == ([before] if before else [])

    code, output = cli(mariadb_db, "current")
    assert code == 0, output
    assert "create_all" not in output and "outboxer db upgrade" in output, output

    code, output = cli(mariadb_db, "upgrade")
    assert code == 0, output
    assert f"upgraded from {before or 'empty'} to {schema.head()}" in output, output
    assert_clean_head(mariadb_db, clean_shape)


def test_db_adopt_on_a_half_made_first_revision_says_to_finish_the_upgrade(
    mariadb_db: str,
) -> None:
    """The first revision killed after its outbox: not tables of create_all to adopt (nor
    to drop), an upgrade to finish."""
    run_killed(mariadb_db, "0001", 3)
    code, output = run_cli(mariadb_db, "adopt")
    assert code == 1, output
    error = one_error(output)
    assert "outboxer db upgrade" in error and "drop them" not in error, output
    assert version_rows(mariadb_db) == []


def test_an_interrupted_adopt_is_named_and_finished_by_adopt(
    mariadb_db: str, clean_shape: dict[str, str]
) -> None:
    """``outboxer db adopt`` killed between making the version table (DDL, committed) and
    recording the revision: the newest revision's tables, the version table empty. Not a
    half-made first revision: `db current` and `db upgrade` say to run adopt again."""
    with engine_at(mariadb_db) as engine:
        schema.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text(f"DELETE FROM {schema.VERSION_TABLE}"))
    code, output = cli(mariadb_db, "current")
    assert code == 0 and "outboxer db adopt` again" in output, output
    code, output = run_cli(mariadb_db, "upgrade")
    assert code == 1 and "outboxer db adopt` again" in one_error(output), output
    code, output = cli(mariadb_db, "adopt")
    assert code == 0, output
    code, output = cli(mariadb_db, "upgrade")
    assert code == 0 and f"already at revision {schema.head()}" in output, output
    assert_clean_head(mariadb_db, clean_shape)


def test_an_interrupted_adopt_is_named_by_the_python_api_too(mariadb_db: str) -> None:
    """``outboxer.schema.upgrade(engine)`` (an application's start-up) on the same state:
    the same fix, not a table of "another shape"."""
    with engine_at(mariadb_db) as engine:
        schema.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text(f"DELETE FROM {schema.VERSION_TABLE}"))
        with pytest.raises(ConfigurationError, match="run `outboxer db adopt` again"):
            schema.upgrade(engine)
        assert schema.adopt(engine) == schema.head()
        assert schema.upgrade(engine) == schema.head()


def run_cli(url: str, *args: str) -> tuple[int, str]:
    """``outboxer db ARGS`` as a process: its exit code, stdout and stderr."""
    done = subprocess.run(
        [OUTBOXER, "db", *args],
        env={**os.environ, "OUTBOXER_DB": url, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def one_error(output: str) -> str:
    """The one ``Error:`` line of ``output`` (and no traceback)."""
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


OTHER_SHAPES = {
    "0001": "CREATE TABLE outboxer_outbox (id BIGINT PRIMARY KEY, body TEXT)",
    "0003": "CREATE TABLE outboxer_relay (relay_id VARCHAR(16) PRIMARY KEY, name VARCHAR(10))",
    "0004": "CREATE TABLE outboxer_schedule (name VARCHAR(255) PRIMARY KEY)",
}


@pytest.mark.parametrize("revision", sorted(OTHER_SHAPES))
def test_a_table_of_another_shape_is_named_in_one_line(mariadb_db: str, revision: str) -> None:
    """What a killed deploy cannot have made (a table of the same name, made otherwise):
    `db upgrade` names it and the fix in one line, exit 1, no traceback; changes nothing."""
    before = previous(revision)
    if before is None:  # killed once it made the version table, before any table
        run_killed(mariadb_db, revision, 0)
    with engine_at(mariadb_db) as engine:
        if before is not None:
            schema.upgrade(engine, before)
        with engine.begin() as connection:
            connection.execute(text(OTHER_SHAPES[revision]))
        made = shape(engine)
    code, output = run_cli(mariadb_db, "upgrade")
    assert code == 1, output
    error = one_error(output)
    table = OTHER_SHAPES[revision].split()[2]
    assert table in error and revision in error and f"DROP TABLE {table}" in error, output
    assert version_rows(mariadb_db) == ([before] if before else [])
    with engine_at(mariadb_db) as engine:
        assert shape(engine) == made

    code, output = run_cli(mariadb_db, "upgrade", "--log-level", "debug")
    assert code == 1 and "Traceback" in output, output


def test_an_index_of_another_shape_is_named_in_one_line(mariadb_db: str) -> None:
    run_killed(mariadb_db, "0001", 1)  # the outbox made, its indexes not
    with engine_at(mariadb_db) as engine, engine.begin() as connection:
        connection.execute(
            text("CREATE INDEX ix_outboxer_outbox_pending ON outboxer_outbox (message_id)")
        )
    code, output = run_cli(mariadb_db, "upgrade")
    assert code == 1, output
    error = one_error(output)
    assert "ix_outboxer_outbox_pending" in error and "message_id" in error, output
    assert "DROP INDEX ix_outboxer_outbox_pending ON outboxer_outbox" in error, output


LONG = os.environ.get("HYPOTHESIS_PROFILE") == "chaos"
ATTEMPTS = 20 if LONG else 4
"""Random kills per run: 4 in ``make test`` (about 15 s), 20 in ``make chaos`` (the tests
marked ``long_profile``), each with a fresh seed, printed."""


def migrating(url: str) -> tuple[subprocess.Popen[str], float]:
    """``outboxer db upgrade`` started, once its migrations began (it logged its first
    revision's start); and that moment."""
    deploy = start_upgrade(url)
    assert deploy.stderr is not None
    for line in deploy.stderr:
        if "Running upgrade" in line:
            return deploy, time.monotonic()
    pytest.fail(f"outboxer db upgrade never migrated: {finish(deploy)}")


@pytest.mark.long_profile
def test_db_upgrade_killed_at_random_moments_is_finished_by_the_next(
    clean_shape: dict[str, str],
) -> None:
    """SIGKILL of a real ``outboxer db upgrade`` a random time after its migrations began
    (within the time a whole upgrade takes here; the seed is printed); then a second one
    reaches the newest revision, clean."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    chance = random.Random(seed)
    started = time.monotonic()
    for url in fresh_database("mariadb"):  # how long the DDL takes on this machine
        deploy, began = migrating(url)
        assert deploy.stderr is not None
        for line in deploy.stderr:  # the newest revision's start: the DDL is done by then
            if f"-> {schema.head()}" in line:
                break
        span = time.monotonic() - began
        finish(deploy)
    left: list[tuple[list[str], int]] = []
    for _ in range(ATTEMPTS):
        for url in fresh_database("mariadb"):
            deploy, began = migrating(url)
            time.sleep(chance.uniform(0.0, span * 1.2))  # the moment of the kill, not a wait
            os.kill(deploy.pid, signal.SIGKILL)
            deploy.wait(timeout=DEADLINE)
            with engine_at(url) as engine:
                left.append((version_rows(url), len(shape(engine))))
            returncode, out, err = finish(start_upgrade(url))
            assert returncode == 0, (seed, left[-1], out, err[-2000:])
            assert_clean_head(url, clean_shape)
    assert time.monotonic() - started < 6 * ATTEMPTS, f"{ATTEMPTS} attempts took too long"
    print(f"the DDL took {span:.2f} s; the kills left (revision, tables):", left)


PG_CASES = [("0001", 1), ("0001", 2), ("0001", 6), ("0001", 12), ("0003", 1), ("0004", 1)]


@pytest.mark.parametrize("rerun", ["autocommit", "cli"])
@pytest.mark.parametrize(("revision", "ran"), PG_CASES, ids=[f"{r}-after-{n}" for r, n in PG_CASES])
def test_a_postgresql_autocommit_upgrade_killed_half_way_is_finished_by_the_next(
    pg_db: str, revision: str, ran: int, rerun: str
) -> None:
    """An application's AUTOCOMMIT engine (docs/migrations.md): each DDL statement commits
    as on MariaDB. Its restart (the same engine) or a deploy's `outboxer db upgrade` (one
    transaction) finishes what the killed run began."""
    before = previous(revision)
    with engine_at(pg_db, isolation_level="AUTOCOMMIT") as engine:
        if before is not None:
            schema.upgrade(engine, before)
        run_killed(pg_db, revision, ran, isolation_level="AUTOCOMMIT")
        assert version_rows(pg_db) == ([before] if before else [])
        if rerun == "autocommit":
            assert schema.upgrade(engine) == schema.head()
        else:
            code, output = cli(pg_db, "upgrade")
            assert code == 0, output
            assert f"upgraded from {before or 'empty'} to {schema.head()}" in output, output
    assert version_rows(pg_db) == [schema.head()]
    assert schema_differences(pg_db) == []


SQLITE_CASES = [("0001", 1), ("0001", 4), ("0001", 11), ("0003", 1), ("0004", 1)]


@pytest.mark.parametrize(
    ("revision", "ran"), SQLITE_CASES, ids=[f"{r}-after-{n}" for r, n in SQLITE_CASES]
)
def test_a_sqlite_upgrade_killed_half_way_is_finished_by_the_next(
    tmp_path: Path, revision: str, ran: int
) -> None:
    """pysqlite runs DDL outside a transaction: a development database whose upgrade was
    interrupted (Ctrl-C in a debugger) is finished by the next one too."""
    sqlite_url = f"sqlite:///{tmp_path / 'dev.sqlite'}"
    before = previous(revision)
    if before is not None:
        with engine_at(sqlite_url) as engine:
            schema.upgrade(engine, before)
    run_killed(sqlite_url, revision, ran)
    assert version_rows(sqlite_url) == ([before] if before else [])
    code, output = cli(sqlite_url, "upgrade")
    assert code == 0, output
    assert version_rows(sqlite_url) == [schema.head()]
    assert schema_differences(sqlite_url) == []


def sqlite_at(tmp_path: Path, revision: str) -> str:
    url = f"sqlite:///{tmp_path / 'dev.sqlite'}"
    with engine_at(url) as engine:
        schema.upgrade(engine, revision)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO outboxer_dead_letter (origin, payload, error_type, "
                    "error_message, attempts, first_failed_at, last_failed_at) VALUES "
                    "('relay', x'00', 'E', 'm', 1, '2026-11-30 00:00:00', "
                    "'2026-11-30 00:00:00')"
                )
            )
    return url


@pytest.mark.parametrize("ran", [1, 2, 3])
def test_a_sqlite_rebuild_killed_half_way_is_done_again_keeping_the_rows(
    tmp_path: Path, ran: int
) -> None:
    """0006 rebuilds the dead-letter table: the copy is made (DDL, committed) before the
    rows move in one transaction. A killed run leaves the copy beside the table, which
    still holds every row: the next upgrade rebuilds again."""
    url = sqlite_at(tmp_path, "0005")
    kill_at(url, "0006", ran)
    code, output = cli(url, "upgrade")
    assert code == 0, output
    assert version_rows(url) == [schema.head()]
    assert schema_differences(url) == []
    with engine_at(url) as engine:
        with engine.connect() as connection:
            assert (
                connection.execute(text("SELECT count(*) FROM outboxer_dead_letter")).scalar() == 1
            )
            made = connection.execute(
                text("SELECT sql FROM sqlite_master WHERE name = 'outboxer_dead_letter'")
            ).scalar()
            assert "AUTOINCREMENT" in str(made)
        assert not [n for n in inspect(engine).get_table_names() if n.startswith("_alembic")]


def test_a_sqlite_rebuild_stopped_between_drop_and_rename_is_named_in_one_line(
    tmp_path: Path,
) -> None:
    """Where only the copy holds the dead letters (its rename never ran), nothing may drop
    it: `db upgrade` names it and the fix in one line."""
    url = sqlite_at(tmp_path, "0005")
    with engine_at(url) as engine, engine.begin() as connection:
        connection.execute(
            text("ALTER TABLE outboxer_dead_letter RENAME TO _alembic_tmp_outboxer_dead_letter")
        )
    code, output = run_cli(url, "upgrade")
    assert code == 1, output
    error = one_error(output)
    assert "_alembic_tmp_outboxer_dead_letter" in error and "0006" in error, output
    assert "RENAME TO outboxer_dead_letter" in error, output
    assert version_rows(url) == ["0005"]
