"""The third review's deployment fixes, attacked: the migration lock under engines and
databases configured otherwise than the CLI's (autocommit, repeatable read), killed
deploys, two databases on one server; the relay's URL options; read-only databases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError

from outboxer import schema, tables
from outboxer.cli import main
from outboxer.diagnosis import diagnose
from outboxer.store import dead_letters

from .services import SERVERS, require
from .test_review3_deployment import (
    DEADLINE,
    finish,
    pg_db,
    server_db,
    start_upgrade,
    upgrade_behind_an_open_one,
    version_rows,
)

__all__ = ["pg_db", "server_db"]


def advisory_locks_held(watch: Connection, pid: int) -> int:
    return int(
        watch.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = :pid"
            ),
            {"pid": pid},
        ).scalar()
        or 0
    )


def test_an_autocommit_engine_still_holds_the_migration_lock_while_migrating(
    pg_db: str,
) -> None:
    """An application's engine in AUTOCOMMIT (as some use for CREATE INDEX CONCURRENTLY):
    a transaction-level advisory lock would end with the statement that took it, and two
    deploys would migrate at once. The lock must be held while the migrations run."""
    engine = create_engine(pg_db, isolation_level="AUTOCOMMIT")
    watcher = create_engine(pg_db, isolation_level="AUTOCOMMIT")
    held: list[int] = []
    try:
        with watcher.connect() as watch:

            def check(connection: Connection, before: str | None) -> None:
                pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                assert isinstance(pid, int)
                held.append(advisory_locks_held(watch, pid))

            schema.upgrade(engine, check=check)
            with engine.connect() as connection:
                pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                assert isinstance(pid, int)
                assert advisory_locks_held(watch, pid) == 0, "the lock outlived the upgrade"
    finally:
        engine.dispose()
        watcher.dispose()
    assert held == [1], "no migration lock held while the migrations ran"
    assert version_rows(pg_db) == [schema.head()]


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_database_defaulting_to_repeatable_read_still_takes_turns(
    pg_db: str, isolation: str
) -> None:
    """``ALTER DATABASE ... SET default_transaction_isolation`` (a common choice): the
    waiting deploy's snapshot must not predate the first deploy's commit, or it sees no
    tables and creates them again."""
    admin = create_engine(pg_db, isolation_level="AUTOCOMMIT")
    database = admin.url.database
    with admin.connect() as connection:
        connection.exec_driver_sql(
            f"ALTER DATABASE {database} SET default_transaction_isolation = '{isolation}'"
        )
    admin.dispose()
    returncode, out, err = upgrade_behind_an_open_one(pg_db)
    assert returncode == 0, err[-2000:]
    assert f"already at revision {schema.head()}" in out, out + err[-2000:]
    assert version_rows(pg_db) == [schema.head()]


HOLDER = """
import sys
from sqlalchemy import create_engine
from outboxer import schema

def hold(connection, before):
    print("holding", flush=True)
    sys.stdin.readline()

schema.upgrade(create_engine(sys.argv[1]), check=hold)
print("done", flush=True)
"""


def start_holder(url: str) -> subprocess.Popen[str]:
    """A deploy that took the migration lock and stays in its turn until its stdin ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    line = holder.stdout.readline()  # blocks until the holder is in its turn (or died)
    if line.strip() != "holding":
        holder.kill()
        pytest.fail(f"the holder never took the lock: {line} {holder.communicate()[1]}")
    return holder


def test_a_deploy_killed_in_its_turn_lets_the_next_one_migrate(server_db: str) -> None:
    """kill -9 of a deploy holding the lock (an OOM kill, a node lost): its session ends, the
    lock with it, and the next deploy migrates (exit 0)."""
    holder = start_holder(server_db)
    try:
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.wait(timeout=DEADLINE)
    returncode, out, err = finish(start_upgrade(server_db))
    assert returncode == 0, err[-2000:]
    assert f"upgraded from empty to {schema.head()}" in out, out + err[-2000:]
    assert version_rows(server_db) == [schema.head()]


def test_two_databases_on_one_server_do_not_wait_for_each_other(server_db: str) -> None:
    """The lock is per database: a deploy upgrading another database of the same server
    (another service, another tenant) goes on while the first holds its turn."""
    kind = "postgresql" if "postgresql" in server_db else "mariadb"
    other = SERVERS[kind].create_database("outboxer_r4")
    holder = start_holder(server_db)
    try:
        returncode, out, err = finish(start_upgrade(other))
        assert returncode == 0, err[-2000:]
        assert f"upgraded from empty to {schema.head()}" in out, out + err[-2000:]
    finally:
        rest, holder_err = holder.communicate(input="\n", timeout=DEADLINE)
        SERVERS[kind].drop_database(other)
    assert holder.returncode == 0 and "done" in rest, holder_err[-2000:]


def db_current(url: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["db", "current"], env={"OUTBOXER_DB": url, "COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.output


def test_an_asyncpg_url_with_asyncpgs_own_query_settings_is_usable(pg_db: str) -> None:
    """An asyncio application's DATABASE_URL behind PgBouncer (``prepared_statement_cache_size
    =0``) with ``ssl=disable``: asyncpg's words for what libpq calls otherwise (or has no
    use for). The commands, which use psycopg, must take it, not say 'invalid connection
    option'."""
    url = make_url(pg_db).set(drivername="postgresql+asyncpg").render_as_string(False)
    code, output = db_current(f"{url}?ssl=disable&prepared_statement_cache_size=0")
    assert code == 0, output
    assert "no outboxer tables" in output, output


def test_an_asyncpg_url_asking_for_tls_is_never_connected_without_it(pg_db: str) -> None:
    """``?ssl=require`` is asyncpg's sslmode: dropping it would connect in the clear. The
    test server has no TLS, so the command must fail saying so."""
    url = make_url(pg_db).set(drivername="postgresql+asyncpg").render_as_string(False)
    code, output = db_current(f"{url}?ssl=require")
    assert code != 0, output
    assert "SSL" in output and "invalid connection option" not in output, output


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_an_error_whose_statement_mentions_read_only_is_not_a_read_only_database(
    kind: str,
) -> None:
    """A duplicate key on a row whose text quotes a broker's or a replica's words ('cannot
    execute INSERT in a read-only transaction'): SQLAlchemy's error shows the statement
    and its parameters, but only the database's own message may say it refuses writes."""
    server = SERVERS[kind]
    require(kind, server.available, server.admin_url)
    url = server.create_database("outboxer_r4")
    engine = create_engine(url)  # an application's engine: parameters shown in errors
    note = "the replica said: cannot execute INSERT in a read-only transaction (--read-only option)"
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, note TEXT)")
            connection.execute(text("INSERT INTO notes VALUES (1, 'first')"))
        with pytest.raises(DBAPIError) as raised, engine.begin() as connection:
            connection.execute(text("INSERT INTO notes VALUES (1, :note)"), {"note": note})
    finally:
        engine.dispose()
        server.drop_database(url)
    assert "read-only transaction" in str(raised.value)  # the statement's words, shown
    assert diagnose(raised.value, db_url=url) is None


def _park(connection: Connection, note: str) -> int:
    dead_letters.insert_dead_letters(
        connection,
        [dead_letters.quarantine(consumer="c", destination="d", error_type="t", error=note)],
    )
    newest = connection.execute(text("SELECT max(id) FROM outboxer_dead_letter")).scalar()
    assert isinstance(newest, int)
    return newest


@pytest.mark.parametrize("made_by", ["upgrade", "create_all"])
def test_sqlite_never_gives_a_deleted_dead_letters_id_to_another(
    tmp_path: Path, made_by: str
) -> None:
    """An operator notes letter 5, a purge deletes it (the newest), a new failure is parked:
    it must not be letter 5 again, or ``outboxer dead-letter replay 5`` acts on a letter
    they never looked at."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
    try:
        if made_by == "upgrade":
            schema.upgrade(engine)
        else:
            tables.create_all(engine)
        with engine.begin() as connection:
            _park(connection, "first")
            noted = _park(connection, "the one the operator noted")
            connection.execute(
                text("DELETE FROM outboxer_dead_letter WHERE id = :id"), {"id": noted}
            )
        with engine.begin() as connection:
            later = _park(connection, "a later failure")
    finally:
        engine.dispose()
    assert later > noted, f"the new letter took the deleted letter's id {noted}"


def test_sqlite_at_0005_keeps_its_dead_letters_and_ids_through_0006(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
    try:
        schema.upgrade(engine, "0005")
        with engine.begin() as connection:
            ids = [_park(connection, f"letter {n}") for n in range(3)]
            connection.execute(
                text("DELETE FROM outboxer_dead_letter WHERE id = :id"), {"id": ids[0]}
            )
        assert schema.upgrade(engine) == schema.head()
        assert schema.differences(engine) == []
        with engine.begin() as connection:
            kept = connection.execute(
                text("SELECT id, error_message FROM outboxer_dead_letter ORDER BY id")
            ).all()
            newest = ids[-1]
            connection.execute(
                text("DELETE FROM outboxer_dead_letter WHERE id = :id"), {"id": newest}
            )
            later = _park(connection, "after the upgrade")
    finally:
        engine.dispose()
    assert [row.id for row in kept] == ids[1:]
    assert "letter 1" in kept[0].error_message
    assert later > newest


def test_sqlite_tables_of_an_older_create_all_are_adopted_before_the_rebuild(
    tmp_path: Path,
) -> None:
    """An older release's ``create_all`` made the dead-letter table without AUTOINCREMENT
    (as revision 0005 has it); a comparison of tables does not see that, so ``adopt`` must
    record 0005, and the next ``upgrade`` rebuild it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
    try:
        schema.upgrade(engine, "0005")
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP TABLE {schema.VERSION_TABLE}")
        assert schema.adopt(engine) == "0005"
        assert schema.upgrade(engine) == schema.head()
        with engine.begin() as connection:
            _park(connection, "first")
            noted = _park(connection, "noted")
            connection.execute(
                text("DELETE FROM outboxer_dead_letter WHERE id = :id"), {"id": noted}
            )
            assert _park(connection, "later") > noted
    finally:
        engine.dispose()
    other = create_engine(f"sqlite:///{tmp_path / 'new.sqlite'}")
    try:
        tables.create_all(other)
        assert schema.adopt(other) == schema.head()  # this release's create_all: the newest
    finally:
        other.dispose()


@pytest.mark.parametrize("autocommit", [False, True])
def test_a_refused_upgrade_leaves_no_lock_on_the_pooled_connection(
    server_db: str, autocommit: bool
) -> None:
    """``check`` refuses the database (or a migration fails): the application's engine keeps
    its connection in the pool, and the lock must not stay with it, or every other deploy
    waits (a day on MariaDB, for ever on PostgreSQL)."""
    options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    engine = create_engine(server_db, pool_size=1, **options)

    def refuse(connection: Connection, before: str | None) -> None:
        raise RuntimeError("refused")

    try:
        with pytest.raises(RuntimeError, match="refused"):
            schema.upgrade(engine, check=refuse)
        with engine.connect():  # the pooled connection, still open meanwhile
            returncode, out, err = finish(start_upgrade(server_db))
    finally:
        engine.dispose()
    assert returncode == 0, err[-2000:]
    assert f"upgraded from empty to {schema.head()}" in out, out + err[-2000:]
