"""``outboxer db upgrade|current|adopt``: the outboxer tables' migrations.

Alembic and the migration scripts are imported by these commands when they run, and by
``db upgrade --help``: every other command, the relay and the consumer among them, starts
without them (about 0.2 s of each start).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..errors import ConfigurationError
from ..tables import VERSION_TABLE, metadata
from .common import console, db_option, failure, make_engine, option, safe_url

CREATE_ALL_FIX = (
    "they have no migration history, so `outboxer db upgrade` cannot upgrade them: run "
    "`outboxer db adopt` to put them under the migrations (docs/migrations.md)"
)

log = logging.getLogger(__name__)


def _revisions_for_help() -> str:
    from .. import schema

    try:
        return "one of " + ", ".join(schema.revisions())
    except ConfigurationError:  # the scripts are missing: `db upgrade` itself says so
        return "one of the revisions this outboxer ships"


class _RevisionOption(click.Option):
    """``--revision``, whose help lists the shipped revisions, read when it is shown."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = f"Revision to upgrade to: head, or {_revisions_for_help()}."
        return super().get_help_record(ctx)


@click.group()
def db() -> None:
    """Create and upgrade the outboxer tables (Alembic, own version table)."""


@db.command()
@db_option()
@option("--revision", cls=_RevisionOption, default="head")
def upgrade(db_url: str, revision: str) -> None:
    """Upgrade the outboxer tables to the newest revision (a no-op when up to date)."""
    from .. import schema

    known = schema.revisions()
    if revision not in ("head", *known):
        raise click.BadParameter(
            f"{revision!r} is not a revision of this outboxer; use head or one of "
            f"{', '.join(known)}",
            param_hint="--revision",
        )
    engine = make_engine(db_url)
    found: list[str | None] = []

    def usable(connection: Connection, before: str | None) -> None:
        # In the migrations' turn (schema.upgrade): a deploy that waited for another one
        # judges the revision that one reached, not the tables it saw half made.
        _check_usable(connection, before, db_url, known)
        if (
            before is not None
            and revision != "head"
            and known.index(revision) < known.index(before)
        ):
            raise click.ClickException(
                f"{safe_url(db_url)} is at revision {before}, past {revision}: outboxer db "
                "upgrade never downgrades"
            )
        found.append(before)

    with _one_line(engine, db_url, "upgrade"):
        after = schema.upgrade(engine, revision, check=usable)
    before = found[0]
    if before == after:
        console.print(f"{safe_url(db_url)}: already at revision {after}")
    else:
        console.print(f"{safe_url(db_url)}: upgraded from {before or 'empty'} to {after}")


@contextmanager
def _one_line(engine: Engine, db_url: str, command: str) -> Iterator[None]:
    """What stops ``outboxer db COMMAND`` (what the database holds, or a refusal of
    :func:`_refusal`) as one line; the engine disposed of in any case."""
    try:
        yield
    except ConfigurationError as exc:
        log.debug("the traceback of the failure below", exc_info=exc)
        raise click.ClickException(f"{safe_url(db_url)}: {exc}") from exc
    except DBAPIError as exc:
        refusal = _refusal(exc, db_url, command)
        if refusal is None:
            raise
        raise refusal from exc
    finally:
        engine.dispose()


def _refusal(exc: DBAPIError, db_url: str, command: str) -> Exception | None:
    """The one line for a database that would not let ``outboxer db COMMAND`` write: a
    search_path to no schema (exit 3: the URL to fix), or a wait its timeout cut short
    (exit 1). A read-only database is :mod:`outboxer.diagnosis`'s, as for every command."""
    if getattr(exc.orig, "sqlstate", None) == "3F000":  # PostgreSQL invalid_schema_name
        return ConfigurationError(
            f"{safe_url(db_url)}: no schema to create the outboxer tables in (the "
            "search_path names none that exists): CREATE SCHEMA the one it names, or fix "
            "the search_path in --db / OUTBOXER_DB"
        )
    setting = _timeout_setting(exc)
    if setting is None:
        return None
    return click.ClickException(
        f"{safe_url(db_url)}: outboxer db {command} waited longer than the database's "
        f"{setting} allows ({failure(exc.orig or exc)}): another deploy may be upgrading it, or a "
        f"long transaction holds the outboxer tables. Run `outboxer db {command}` again once "
        f"it ends, or give this user a longer {setting}"
    )


def _errno(exc: DBAPIError) -> int | None:
    """MariaDB/MySQL's error number (PyMySQL, asyncmy: the first argument)."""
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _timeout_setting(exc: DBAPIError) -> str | None:
    """The database setting that cut a wait short, when ``exc`` is such a timeout."""
    sqlstate = getattr(exc.orig, "sqlstate", None)  # psycopg
    if sqlstate in ("55P03", "57014"):
        return "lock_timeout" if sqlstate == "55P03" else "statement_timeout"
    errno = _errno(exc)
    if errno == 1205:  # MariaDB/MySQL: a row or metadata lock waited too long
        return "lock_wait_timeout (innodb_lock_wait_timeout)"
    if errno in (1969, 3024):  # MariaDB's max_statement_time, MySQL's max_execution_time
        return "max_statement_time" if errno == 1969 else "max_execution_time"
    return None


def _check_usable(
    connection: Connection, before: str | None, db_url: str, known: list[str]
) -> None:
    """A ClickException naming the fix when the migrations cannot start from the database's
    revision ``before`` (tables made by create_all, a newer release's revision)."""
    from .. import schema
    from ..migration_steps import first_revision_interrupted

    if before is None and first_revision_interrupted(connection):
        return  # a killed upgrade's first revision, half made: the migrations finish it
    if before is None and schema.tables_present(connection):
        raise click.ClickException(
            f"the outboxer tables of {safe_url(db_url)} were made by outboxer.create_all: "
            + CREATE_ALL_FIX
        )
    if before is not None and before not in known:
        raise click.ClickException(
            f"{safe_url(db_url)} is at revision {before}, newer than this outboxer knows "
            f"(its newest is {known[-1]}): run the outboxer release that upgraded it"
        )
    dropped = _dropped(connection, before, known)
    if dropped:
        raise click.ClickException(f"{safe_url(db_url)}: {dropped}")


def _dropped(bind: Connection | Engine, revision: str | None, known: list[str]) -> str | None:
    """What to say when ``revision`` is recorded but its tables are gone: dropped outside
    the migrations (``outboxer.drop_all``, a DBA), so that the version table says "up to
    date" while every process says "the outboxer tables are missing"; None otherwise."""
    from .. import schema

    if revision is None or revision not in known:
        return None
    present = set(schema.tables_present(bind))
    recorded = f"revision {revision} is recorded in {VERSION_TABLE}"
    if not present:
        return (
            f"{recorded}, but the outboxer tables are missing (dropped outside the "
            f"migrations, by outboxer.drop_all for instance): DROP TABLE "
            f"{VERSION_TABLE}, then run `outboxer db upgrade` to create them"
        )
    missing = sorted(set(metadata.tables) - present)
    if revision != known[-1] or not missing:
        return None  # an older revision's tables are for its migrations to judge
    return (
        f"{recorded}, but {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} missing (dropped outside the migrations): "
        "outboxer.create_all(engine) creates the missing tables of this revision; or restore "
        "them from a backup"
    )


@db.command()
@db_option()
def current(db_url: str) -> None:
    """Show the revision the database is at, and the newest one available."""
    from .. import schema
    from ..migration_steps import first_revision_interrupted

    engine = make_engine(db_url)
    try:
        revision = schema.current(engine)
        tables = schema.tables_present(engine) if revision is None else []
        with engine.connect() as connection:
            interrupted = bool(tables) and first_revision_interrupted(connection)
            adopting = interrupted and not schema.differences(connection)
            dropped = _dropped(connection, revision, schema.revisions())
    except ConfigurationError as exc:
        raise click.ClickException(f"{safe_url(db_url)}: {exc}") from exc
    finally:
        engine.dispose()
    known = schema.revisions()
    head = known[-1]
    if adopting:
        state = (
            f"tables of revision {head}, which no revision is recorded for (an interrupted "
            "`outboxer db adopt`): run `outboxer db adopt` again"
        )
    elif interrupted:
        state = (
            f"revision {known[0]} half made: an `outboxer db upgrade` was interrupted in it "
            f"(newest revision is {head}): run `outboxer db upgrade` to finish"
        )
    elif revision is None and tables:
        state = f"tables made by outboxer.create_all (newest revision is {head}): {CREATE_ALL_FIX}"
    elif revision is None:
        state = f"no outboxer tables (newest revision is {head}): run `outboxer db upgrade`"
    elif revision not in known:
        state = (
            f"{revision} - newer than this outboxer knows (its newest is {head}): upgrade the "
            "outboxer package"
        )
    elif dropped:
        state = dropped
    elif revision == head:
        state = f"{revision} - up to date"
    else:
        state = f"{revision} - behind (newest is {head}): run `outboxer db upgrade`"
    console.print(f"{safe_url(db_url)}: {state}")


@db.command()
@db_option()
def adopt(db_url: str) -> None:
    """Put tables made by outboxer.create_all under the migrations.

    Checks that they match the newest revision exactly, then records it, so that later
    `outboxer db upgrade` runs take them from there. Tables that differ are refused,
    with what differs."""
    from .. import schema

    engine = make_engine(db_url)
    with _one_line(engine, db_url, "adopt"):
        revision = schema.adopt(engine)
    console.print(f"{safe_url(db_url)}: adopted at revision {revision}")
