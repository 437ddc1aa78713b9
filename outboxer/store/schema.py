"""Is the database ready for outboxer? A start-up check for the relay, consumers and status.

Without it a process on a database that nobody ran ``outboxer db upgrade`` on fails deep in
its loop ("a batch failed (database trouble?)", forever). :func:`require_tables` says what
is missing, and how to fix it, before any work starts::

    with engine.connect() as connection:
        require_tables(connection)      # raises TablesMissing
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from ..errors import TablesMissing
from ..secrets import mask_url
from ..tables import metadata

__all__ = ["missing_tables", "require_tables", "tables_missing"]


def missing_tables(connection: Connection, tables: Iterable[str] | None = None) -> list[str]:
    """The outboxer tables (all of them, or those named) the database lacks, sorted."""
    wanted = sorted(tables) if tables is not None else sorted(metadata.tables)
    inspector = inspect(connection)
    return [name for name in wanted if not inspector.has_table(name)]


def require_tables(connection: Connection, tables: Iterable[str] | None = None) -> None:
    """Raise :class:`~outboxer.errors.TablesMissing` unless every outboxer table (or every
    one named) exists; the message names the ``outboxer db upgrade`` to run.

    It reads the catalog in the connection's transaction (autobegun if none is open).
    """
    missing = missing_tables(connection, tables)
    if missing:
        raise tables_missing(connection.engine.url.render_as_string(hide_password=False), missing)


def tables_missing(db_url: str | None, missing: list[str] | None = None) -> TablesMissing:
    """The error for a database without (some of) outboxer's tables (the URL masked)."""
    which = f" ({', '.join(missing)})" if missing else ""
    where = mask_url(db_url) if db_url else "URL"
    return TablesMissing(
        f"the outboxer tables are missing{which}: run `outboxer db upgrade --db {where}`"
    )
