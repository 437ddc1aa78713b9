"""``outboxer db upgrade|current|adopt``: the outboxer tables' migrations."""

from __future__ import annotations

import click
from sqlalchemy.engine import Engine

from .. import schema
from ..errors import ConfigurationError
from .common import console, db_option, make_engine, option, safe_url

CREATE_ALL_FIX = (
    "they have no migration history, so `outboxer db upgrade` cannot upgrade them: run "
    "`outboxer db adopt` to put them under the migrations (docs/migrations.md)"
)


@click.group()
def db() -> None:
    """Create and upgrade the outboxer tables (Alembic, own version table)."""


@db.command()
@db_option()
@option("--revision", default="head", help="Revision to upgrade to (head, or one of --help's).")
def upgrade(db_url: str, revision: str) -> None:
    """Upgrade the outboxer tables to the newest revision (a no-op when up to date)."""
    known = schema.revisions()
    if revision not in ("head", *known):
        raise click.BadParameter(
            f"{revision!r} is not a revision of this outboxer; use head or one of "
            f"{', '.join(known)}",
            param_hint="--revision",
        )
    engine = make_engine(db_url)
    try:
        before = _usable_revision(engine, db_url, known)
        if (
            before is not None
            and revision != "head"
            and known.index(revision) < known.index(before)
        ):
            raise click.ClickException(
                f"{safe_url(db_url)} is at revision {before}, past {revision}: outboxer db "
                "upgrade never downgrades"
            )
        after = schema.upgrade(engine, revision)
    finally:
        engine.dispose()
    if before == after:
        console.print(f"{safe_url(db_url)}: already at revision {after}")
    else:
        console.print(f"{safe_url(db_url)}: upgraded from {before or 'empty'} to {after}")


def _usable_revision(engine: Engine, db_url: str, known: list[str]) -> str | None:
    """The database's revision, when the migrations can start from it; otherwise a
    ClickException naming the fix (tables made by create_all, a newer release's revision)."""
    before = schema.current(engine)
    if before is None and schema.tables_present(engine):
        raise click.ClickException(
            f"the outboxer tables of {safe_url(db_url)} were made by outboxer.create_all: "
            + CREATE_ALL_FIX
        )
    if before is not None and before not in known:
        raise click.ClickException(
            f"{safe_url(db_url)} is at revision {before}, newer than this outboxer knows "
            f"(its newest is {known[-1]}): run the outboxer release that upgraded it"
        )
    return before


@db.command()
@db_option()
def current(db_url: str) -> None:
    """Show the revision the database is at, and the newest one available."""
    engine = make_engine(db_url)
    try:
        revision = schema.current(engine)
        tables = schema.tables_present(engine) if revision is None else []
    finally:
        engine.dispose()
    known = schema.revisions()
    head = known[-1]
    if revision is None and tables:
        state = f"tables made by outboxer.create_all (newest revision is {head}): {CREATE_ALL_FIX}"
    elif revision is None:
        state = f"no outboxer tables (newest revision is {head}): run `outboxer db upgrade`"
    elif revision not in known:
        state = (
            f"{revision} - newer than this outboxer knows (its newest is {head}): upgrade the "
            "outboxer package"
        )
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
    engine = make_engine(db_url)
    try:
        revision = schema.adopt(engine)
    except ConfigurationError as exc:
        raise click.ClickException(f"{safe_url(db_url)}: {exc}") from exc
    finally:
        engine.dispose()
    console.print(f"{safe_url(db_url)}: adopted at revision {revision}")
