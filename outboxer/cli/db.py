"""``outboxer db upgrade|current``: the outboxer tables' migrations."""

from __future__ import annotations

import click

from .. import schema
from .common import console, db_option, make_engine, option, safe_url


@click.group()
def db() -> None:
    """Create and upgrade the outboxer tables (Alembic, own version table)."""


@db.command()
@db_option()
@option("--revision", default="head", help="Revision to upgrade to.")
def upgrade(db_url: str, revision: str) -> None:
    """Upgrade the outboxer tables to the newest revision (a no-op when up to date)."""
    engine = make_engine(db_url)
    try:
        before = schema.current(engine)
        after = schema.upgrade(engine, revision)
    finally:
        engine.dispose()
    if before == after:
        console.print(f"{safe_url(db_url)}: already at revision {after}")
    else:
        console.print(f"{safe_url(db_url)}: upgraded from {before or 'empty'} to {after}")


@db.command()
@db_option()
def current(db_url: str) -> None:
    """Show the revision the database is at, and the newest one available."""
    engine = make_engine(db_url)
    try:
        revision = schema.current(engine)
    finally:
        engine.dispose()
    head = schema.head()
    state = "up to date" if revision == head else f"behind (newest is {head})"
    console.print(f"{safe_url(db_url)}: {revision or 'no outboxer tables'} - {state}")
