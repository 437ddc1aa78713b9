"""The Alembic migrations build exactly outboxer.metadata, and never touch the app's Alembic."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import create_engine, event, inspect

import outboxer
from outboxer import schema
from outboxer.cli import main
from outboxer.tables import relays

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)


def schema_differences(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        return schema.differences(engine)
    finally:
        engine.dispose()


def test_upgrade_from_empty_yields_the_metadata_schema_and_again_is_a_no_op(
    empty_db_url: str,
) -> None:
    engine = create_engine(empty_db_url)
    assert schema.current(engine) is None
    assert schema.upgrade(engine) == schema.head()
    assert schema_differences(empty_db_url) == []

    ddl: list[str] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *a: (
            ddl.append(statement)
            if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP"))
            else None
        ),
    )
    assert schema.upgrade(engine) == schema.head()
    assert ddl == []
    assert schema.current(engine) == schema.head()
    engine.dispose()


def test_create_all_and_the_migrations_agree(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)
    outboxer.create_all(engine)
    engine.dispose()
    assert schema_differences(empty_db_url) == []


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
@pytest.mark.parametrize("how", ["migrations", "create_all"])
def test_the_outbox_is_a_queue_table_on_postgresql(empty_db_url: str, how: str) -> None:
    """Half-filled pages (a claim's lease is a HOT update) and a fixed autovacuum threshold,
    whichever way the tables were made; a downgrade puts the fill factor back."""
    engine = create_engine(empty_db_url)
    if how == "migrations":
        schema.upgrade(engine)
    else:
        outboxer.create_all(engine)

    def options() -> set[str]:
        with engine.connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE relname = 'outboxer_outbox'"
            ).scalar_one()
        return set(found or ())

    assert {"fillfactor=50", "autovacuum_vacuum_threshold=10000"} <= options()
    if how == "migrations":
        script = schema.script_directory()
        with engine.begin() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "version_table": schema.VERSION_TABLE,
                    "fn": lambda rev, _context: script._downgrade_revs("0004", rev),
                },
            )
            with Operations.context(context), context.begin_transaction():
                context.run_migrations()
        assert schema.current(engine) == "0004"
        assert "fillfactor=50" not in options()
        assert "autovacuum_vacuum_threshold=10000" in options()
    engine.dispose()


def test_cli_db_upgrade_and_current(empty_db_url: str) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["db", "current", "--db", empty_db_url])
    assert result.exit_code == 0, result.output
    assert "no outboxer tables" in result.output

    result = runner.invoke(main, ["db", "upgrade"], env={"OUTBOXER_DB": empty_db_url})
    assert result.exit_code == 0, result.output
    assert f"upgraded from empty to {schema.head()}" in result.output

    result = runner.invoke(main, ["db", "upgrade", "--db", empty_db_url])
    assert result.exit_code == 0, result.output
    assert "already at revision" in result.output

    result = runner.invoke(main, ["db", "current", "--db", empty_db_url])
    assert "up to date" in result.output
    tables = set(inspect(create_engine(empty_db_url)).get_table_names())
    assert set(outboxer.metadata.tables) | {schema.VERSION_TABLE} <= tables


def test_cli_rejects_a_bad_url_clearly() -> None:
    result = CliRunner().invoke(main, ["db", "upgrade", "--db", "not a url"])
    assert result.exit_code == 3  # invalid URL (docs/operations.md)
    assert "not a database URL" in result.output


def test_runs_from_the_applications_own_alembic_environment(
    empty_db_url: str, tmp_path: Path
) -> None:
    """An app's env.py calls outboxer.schema.upgrade(connection) after its own migrations."""
    app = tmp_path / "app_migrations"
    (app / "versions").mkdir(parents=True)
    (app / "env.py").write_text(
        textwrap.dedent(
            """
            from alembic import context
            from sqlalchemy import create_engine
            import outboxer.schema

            engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
            with engine.connect() as connection:
                context.configure(
                    connection=connection,
                    include_object=outboxer.schema.include_object,
                )
                with context.begin_transaction():
                    context.run_migrations()
                outboxer.schema.upgrade(connection)
            """
        )
    )
    (app / "versions" / "a1_app.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op

            revision = "a1"
            down_revision = None
            branch_labels = None
            depends_on = None

            def upgrade():
                op.create_table("app_things", sa.Column("id", sa.Integer, primary_key=True))

            def downgrade():
                op.drop_table("app_things")
            """
        )
    )
    config = Config()
    config.set_main_option("script_location", str(app))
    config.set_main_option("sqlalchemy.url", empty_db_url)
    command.upgrade(config, "head")

    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        app_version = MigrationContext.configure(conn).get_current_revision()
    assert app_version == "a1"  # the app's own history is untouched
    assert schema.current(engine) == schema.head()  # outboxer's is in its own table
    tables = set(inspect(engine).get_table_names())
    assert {"app_things", "alembic_version", schema.VERSION_TABLE} <= tables
    assert set(outboxer.metadata.tables) <= tables
    engine.dispose()
    command.upgrade(config, "head")  # and running it again changes nothing
    assert schema_differences(empty_db_url) == []


def test_include_object_hides_outboxer_tables_from_app_autogenerate() -> None:
    assert schema.include_object(outboxer.outbox, "outboxer_outbox", "table", False, None) is False
    index = next(iter(outboxer.outbox.indexes))
    assert schema.include_object(index, index.name, "index", False, None) is False
    assert schema.include_object(object(), "orders", "table", True, None) is True


@pytest.mark.slow
def test_the_wheel_ships_the_migrations(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("outboxer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "outboxer/_migrations/env.py" in names
    assert any(n.startswith("outboxer/_migrations/versions/0001_") for n in names)
    assert "outboxer/py.typed" in names


def test_tables_made_by_create_all_are_adopted_then_upgraded_like_migrated_ones(
    empty_db_url: str,
) -> None:
    """A database started with ``create_all`` (the quick start) goes to production: before,
    ``db upgrade`` could only refuse it, and the advice was to drop the tables."""
    engine = create_engine(empty_db_url)
    outboxer.create_all(engine)
    with engine.begin() as conn:  # what the tables hold stays
        conn.execute(
            relays.insert().values(relay_id="r" * 16, name="a", started_at=NOW, seen_at=NOW)
        )
    engine.dispose()
    runner = CliRunner()
    env = {"OUTBOXER_DB": empty_db_url}
    adopted = runner.invoke(main, ["db", "adopt"], env=env)
    assert adopted.exit_code == 0, adopted.output
    assert f"adopted at revision {schema.head()}" in adopted.output
    engine = create_engine(empty_db_url)
    assert schema.current(engine) == schema.head()
    assert schema_differences(empty_db_url) == []
    with engine.connect() as conn:
        assert conn.execute(relays.select()).all() != []
    engine.dispose()
    current = runner.invoke(main, ["db", "current"], env=env)
    assert "up to date" in current.output, current.output
    upgrade = runner.invoke(main, ["db", "upgrade"], env=env)
    assert upgrade.exit_code == 0 and "already at revision" in upgrade.output, upgrade.output
    again = runner.invoke(main, ["db", "adopt"], env=env)
    assert again.exit_code == 1 and "under the migrations already" in again.output


def test_tables_that_differ_from_the_newest_revision_are_not_adopted(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)
    outboxer.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP INDEX ix_outboxer_outbox_key ON outboxer_outbox"
            if engine.dialect.name == "mysql"
            else "DROP INDEX ix_outboxer_outbox_key"
        )
    engine.dispose()
    result = CliRunner().invoke(main, ["db", "adopt"], env={"OUTBOXER_DB": empty_db_url})
    assert result.exit_code == 1, result.output
    assert "ix_outboxer_outbox_key" in result.output and "cannot be adopted" in result.output
    assert schema.current(create_engine(empty_db_url)) is None
    empty = CliRunner().invoke(main, ["db", "adopt"], env={"OUTBOXER_DB": "sqlite://"})
    assert empty.exit_code == 1 and "db upgrade` creates them" in empty.output
