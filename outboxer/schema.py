"""Schema migrations for the outboxer tables (Alembic).

The migration scripts live in the repository's top-level ``migrations/`` directory and
ship inside the wheel as ``outboxer/_migrations``. They keep their own version table,
``outboxer_alembic_version``, so they never clash with an application's own Alembic
history. Two ways to run them:

* ``outboxer db upgrade --db URL`` (or :func:`upgrade` with an engine);
* from the application's Alembic ``env.py``: ``outboxer.schema.upgrade_from_env(context,
  connection)`` after the application's own ``context.run_migrations()``, which upgrades
  outboxer's tables on ``alembic upgrade`` only (``--sql`` included) and on no other
  command (see docs/migrations.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.operations import Operations
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from .errors import ConfigurationError
from .migration_steps import refuse_interrupted_adopt
from .tables import OUTBOX_AUTOVACUUM, OUTBOX_FILLFACTOR, VERSION_TABLE, metadata

__all__ = [
    "VERSION_TABLE",
    "adopt",
    "current",
    "differences",
    "head",
    "include_object",
    "migrations_dir",
    "revisions",
    "tables_present",
    "upgrade",
    "upgrade_from_env",
]


MIGRATION_LOCK = 0x6F7574626F786572  # "outboxer": PostgreSQL's advisory lock key, per database
"""Deploys that upgrade one database at the same moment take turns on this lock: the
others wait, then find the newest revision (PostgreSQL: an advisory lock held until the
migrations' transaction ends; MariaDB/MySQL: ``GET_LOCK`` named after the database)."""
MIGRATION_LOCK_WAIT = 86400
"""Seconds MariaDB/MySQL waits for another deploy's migrations (a day: as long as they take)."""

log = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """The directory holding outboxer's Alembic scripts (installed or from a checkout)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "versions").is_dir():
            return candidate
    raise ConfigurationError(
        f"outboxer's migration scripts are missing (looked in {package / '_migrations'} and "
        f"{package.parent / 'migrations'}); reinstall the outboxer package"
    )


def script_directory() -> ScriptDirectory:
    return ScriptDirectory(str(migrations_dir()))


def head() -> str:
    """The newest revision shipped with this version of outboxer."""
    revision = script_directory().get_current_head()
    assert revision is not None
    return revision


def revisions() -> list[str]:
    """Every revision shipped with this version of outboxer, oldest first."""
    return [script.revision for script in reversed(list(script_directory().walk_revisions()))]


def tables_present(bind: Engine | Connection) -> list[str]:
    """The outboxer tables the database holds (its version table aside)."""
    with _connection(bind) as connection:
        names = set(inspect(connection).get_table_names())
    return sorted(names & set(metadata.tables))


def current(bind: Engine | Connection) -> str | None:
    """The revision the database is at (None: outboxer's migrations never ran)."""
    with _connection(bind) as connection:
        context = MigrationContext.configure(connection, opts=_version_table(connection))
        return _revision(context)


def _version_table(connection: Connection) -> dict[str, Any]:
    """Alembic's options for outboxer's version table: on PostgreSQL in the schema the
    migrations create in (the session's ``current_schema()``, which SQLAlchemy reads at
    connect), since by bare name Alembic found another schema's on the ``search_path``."""
    where = connection.dialect.default_schema_name
    if connection.dialect.name == "postgresql" and where:
        return {"version_table": VERSION_TABLE, "version_table_schema": where}
    return {"version_table": VERSION_TABLE}


def _revision(context: MigrationContext) -> str | None:
    """The one revision in the version table (None: empty or missing); ConfigurationError
    when it holds several (a stamp run by hand), naming them."""
    heads = context.get_current_heads()
    if len(heads) > 1:
        found = ", ".join(sorted(heads))
        raise ConfigurationError(
            f"{VERSION_TABLE} holds several revisions ({found}), where outboxer's "
            f"migrations record one: keep the row of the revision the tables are at "
            f"(usually the newest, {max(heads)}) and delete the others"
        )
    return heads[0] if heads else None


def upgrade(
    bind: Engine | Connection,
    revision: str = "head",
    *,
    check: Callable[[Connection, str | None], None] | None = None,
) -> str | None:
    """Upgrade the outboxer tables to ``revision``; returns the revision reached.

    With an Engine, or a Connection with no transaction in progress, outboxer commits.
    With a Connection inside a transaction, it runs in that transaction and the caller
    commits. From an application's Alembic ``env.py``, call it after the
    ``with context.begin_transaction(): context.run_migrations()`` block.

    Processes that upgrade one database at once take turns (:data:`MIGRATION_LOCK`): the
    later ones wait, then start from the revision the first reached. ``check`` is called
    with the connection and that revision, in its turn, before any migration runs (raise
    to refuse the database).
    """
    script = script_directory()

    def steps(rev: Any, context: MigrationContext) -> Any:
        return script._upgrade_revs(revision, rev)

    with _connection(bind) as connection:
        # A transaction the caller began (as Alembic decides below): its commit is theirs.
        theirs = connection.in_transaction()
        context = MigrationContext.configure(
            connection,
            opts={**_version_table(connection), "target_metadata": metadata, "fn": steps},
        )
        # Alembic's own transaction rules: one transaction where DDL is transactional
        # (PostgreSQL, SQLite under Alembic's control), a commit per migration where it is
        # not (MariaDB), and nothing of its own inside a transaction the caller began.
        with (
            Operations.context(context),
            context.begin_transaction(),
            _migration_lock(connection, theirs),
        ):
            before = _revision(context)
            refuse_interrupted_adopt(connection)
            if check is not None:
                check(connection, before)
            context.run_migrations()
        return context.get_current_revision()


@contextmanager
def _migration_lock(connection: Connection, theirs: bool = False) -> Iterator[None]:
    """Hold :data:`MIGRATION_LOCK` on ``connection``'s database while the block runs.

    PostgreSQL: a transaction-level advisory lock, held until the migrations are committed
    (by outboxer, or by the caller whose transaction they ran in: ``theirs``), which a
    transaction pooler (PgBouncer) keeps on one server connection. In a transaction of
    outboxer's own it is taken under READ COMMITTED, so that what the migrations read is
    what the previous holder committed, even where the database defaults to repeatable
    read or serializable (whose snapshot would predate that commit). An AUTOCOMMIT
    connection has no transaction to hold it: there, a lock of the session, released at
    the end. MariaDB and MySQL, whose DDL commits as it goes: a named lock of the session
    (``GET_LOCK``), released at the end. SQLite: none (one process in development)."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        if not _autocommit(connection):
            if not theirs:  # the first statement of outboxer's own transaction
                connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            _take(connection, "pg_try_advisory_xact_lock(:key)", "pg_advisory_xact_lock(:key)")
            yield
            return
        _take(connection, "pg_try_advisory_lock(:key)", "pg_advisory_lock(:key)")
        unlock = "pg_advisory_unlock(:key)"
    elif dialect in ("mysql", "mariadb"):
        name = "CONCAT('outboxer_migrations_', SHA1(COALESCE(DATABASE(), '')))"
        if not _take(connection, f"GET_LOCK({name}, 0)", f"GET_LOCK({name}, :wait)"):
            raise ConfigurationError(
                f"another process has been upgrading the outboxer tables for "
                f"{MIGRATION_LOCK_WAIT} s (holding their GET_LOCK): end it, then run "
                "`outboxer db upgrade` again"
            )
        unlock = f"RELEASE_LOCK({name})"
    else:
        yield
        return
    try:
        yield
    except BaseException:
        try:  # the failure propagates; a connection too broken to unlock has lost the lock
            connection.execute(text(f"SELECT {unlock}"), {"key": MIGRATION_LOCK})
        except Exception:
            log.debug("could not release the migration lock", exc_info=True)
        raise
    connection.execute(text(f"SELECT {unlock}"), {"key": MIGRATION_LOCK})


def _autocommit(connection: Connection) -> bool:
    """Whether ``connection`` commits each statement (``isolation_level="AUTOCOMMIT"``)."""
    return bool(getattr(connection.connection.dbapi_connection, "autocommit", False))


def _take(connection: Connection, at_once: str, waiting: str) -> bool:
    """Take the migration lock with ``at_once``, or say so and wait with ``waiting``;
    whether it was taken (MariaDB's wait can time out; PostgreSQL's returns nothing)."""
    if connection.execute(text(f"SELECT {at_once}"), {"key": MIGRATION_LOCK}).scalar() in (
        True,
        1,
    ):
        return True
    log.info("another process is upgrading the outboxer tables: waiting for it")
    if ":wait" in waiting:
        got = connection.execute(text(f"SELECT {waiting}"), {"wait": MIGRATION_LOCK_WAIT})
        return got.scalar() == 1
    connection.execute(text(f"SELECT {waiting}"), {"key": MIGRATION_LOCK})
    return True


def differences(bind: Engine | Connection) -> list[str]:
    """How the database's outboxer tables differ from this outboxer's newest schema, one
    line each (Alembic's comparison of tables, columns, types, indexes; empty: the same)."""
    with _connection(bind) as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "compare_server_default": _same_server_default,
                "include_object": _only_outboxer,
            },
        )
        return [_describe(diff) for diff in compare_metadata(context, metadata)]


def adopt(bind: Engine | Connection) -> str:
    """Put tables made by :func:`outboxer.tables.create_all` under the migrations: when
    they match the newest revision exactly (:func:`differences`), record that revision in
    the version table, so that ``outboxer db upgrade`` takes them from there. Returns the
    revision; ConfigurationError (naming what differs) when they do not match, when there
    are no tables (``upgrade`` creates them) or when the migrations already ran. With an
    Engine, outboxer commits; with a Connection, the caller does.

    On PostgreSQL the outbox's storage options (fill factor, autovacuum threshold) are set
    as the newest revision sets them: a comparison of tables does not see them, and tables
    made by an older ``create_all`` may lack them. On SQLite a dead-letter table without
    AUTOINCREMENT (an older ``create_all``'s) is recorded at revision 0005, so that
    ``upgrade`` rebuilds it (0006).
    """
    if isinstance(bind, Engine):
        with bind.begin() as connection:  # one transaction: checked and recorded together
            return adopt(connection)
    connection = bind
    newest = head()
    at = current(connection)
    if at is not None:
        raise ConfigurationError(
            f"the outboxer tables are under the migrations already (revision {at}): "
            "run `outboxer db upgrade`"
        )
    if not tables_present(connection):
        raise ConfigurationError(
            "there are no outboxer tables to adopt: `outboxer db upgrade` creates them"
        )
    found = differences(connection)
    if found and inspect(connection).has_table(VERSION_TABLE):  # not create_all's: see below
        raise ConfigurationError(
            f"an interrupted `outboxer db upgrade` made part of revision {revisions()[0]} "
            "(the version table, some tables): run `outboxer db upgrade` to finish it"
        )
    if found:
        more = f"; and {len(found) - 5} more" if len(found) > 5 else ""
        raise ConfigurationError(
            f"the outboxer tables differ from revision {newest}, so they cannot be adopted: "
            f"{'; '.join(found[:5])}{more}. Another version's create_all made them: move "
            "out what they hold, drop them, and run `outboxer db upgrade`"
        )
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(OUTBOX_AUTOVACUUM)
        connection.exec_driver_sql(OUTBOX_FILLFACTOR)
    if connection.dialect.name == "sqlite" and not _sqlite_autoincrement(connection):
        # An older create_all's dead-letter table, whose ids SQLite reuses (a comparison of
        # tables does not see it): recorded before 0006, whose rebuild `upgrade` then runs.
        newest = "0005"
    context = MigrationContext.configure(connection, opts=_version_table(connection))
    context.stamp(script_directory(), newest)
    return newest


def _sqlite_autoincrement(connection: Connection) -> bool:
    """Whether SQLite's dead-letter table never reuses ids (AUTOINCREMENT)."""
    sql = connection.execute(
        text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name"),
        {"name": "outboxer_dead_letter"},
    ).scalar()
    return "AUTOINCREMENT" in str(sql or "").upper()


def _only_outboxer(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
    return (type_ != "table" or (name or "").startswith("outboxer_")) and name != VERSION_TABLE


def _same_server_default(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """MariaDB reflects a boolean default as 0/1 where the metadata says false/true."""
    spellings = {"0": "false", "1": "true", "false": "false", "true": "true"}
    inspected = (inspected_default or "").strip("'\"").lower()
    rendered = (rendered_metadata_default or "").strip("'\"").lower()
    if inspected in spellings and rendered in spellings:
        return spellings[inspected] != spellings[rendered]
    return None  # Alembic's own comparison


def _describe(diff: Any) -> str:
    """One of Alembic's differences as a short line ("add_index ix_... on outboxer_outbox")."""
    if isinstance(diff, list):  # column modifications come as a list of tuples
        return ", ".join(_describe(d) for d in diff)
    kind, *rest = diff
    names = []
    for item in rest:
        name = getattr(item, "name", None)
        table = getattr(getattr(item, "table", None), "name", None)
        if name:
            names.append(f"{name} on {table}" if table and table != name else str(name))
        elif isinstance(item, str):
            names.append(item)
    return f"{kind} {' '.join(names[:3])}".strip()


def upgrade_from_env(context: EnvironmentContext, connection: Connection | None = None) -> None:
    """From an application's Alembic ``env.py``: upgrade outboxer's tables with the app's.

    Call it after the application's ``with context.begin_transaction():
    context.run_migrations()`` block, with the connection in online mode and without one
    in offline mode. It acts on ``alembic upgrade`` only: ``current``, ``check``,
    ``revision --autogenerate``, ``stamp`` and ``downgrade`` run the same ``env.py`` and
    must not change outboxer's tables. With ``alembic upgrade --sql`` it writes outboxer's
    DDL (from its first revision, as the application's own script starts from its base)
    into the same SQL output; for a range (``upgrade A:B --sql``) it writes a comment
    instead, since outboxer's own starting point is unknown offline.
    """
    app = context.get_context()
    # Alembic tells env.py which command runs only through the function it was given
    # (upgrade() names it "upgrade"); tests/test_alembic_env.py pins this for each command.
    command = getattr(app.opts.get("fn"), "__name__", None)
    if command != "upgrade":
        return
    if not context.is_offline_mode():
        if connection is None:
            raise ConfigurationError(
                "outboxer.schema.upgrade_from_env(context, connection) needs the connection "
                "in online mode: the one your env.py passed to context.configure()"
            )
        upgrade(connection)
        return
    if context.get_starting_revision_argument() is not None:
        app.impl.static_output(
            "-- outboxer: its tables are not in a ranged script; run `outboxer db upgrade`"
        )
        return
    script = script_directory()

    def steps(rev: Any, migration: MigrationContext) -> Any:
        return script._upgrade_revs("head", rev)

    offline = MigrationContext.configure(
        dialect=app.dialect,
        opts={
            "as_sql": True,
            "output_buffer": app.output_buffer,
            "literal_binds": True,
            "version_table": VERSION_TABLE,
            "target_metadata": metadata,
            "fn": steps,
        },
    )
    with Operations.context(offline), offline.begin_transaction():
        offline.run_migrations()


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """For the application's Alembic ``include_object``: leave outboxer's tables alone.

    ``context.configure(..., include_object=outboxer.schema.include_object)`` stops the
    application's autogenerate from proposing to drop or alter outboxer's tables.
    """
    table = obj if type_ == "table" else getattr(obj, "table", None)
    table_name = getattr(table, "name", name) or ""
    return not (table_name.startswith("outboxer_") or table_name == VERSION_TABLE)


def outboxer_table_names() -> Iterable[str]:
    return list(metadata.tables)


@contextmanager
def _connection(bind: Engine | Connection) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.connect() as connection:
        yield connection
