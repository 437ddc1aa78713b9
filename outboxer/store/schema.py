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

from ..errors import DatabaseUnavailable, TablesMissing
from ..secrets import mask_url
from ..tables import metadata

__all__ = ["missing_tables", "read_only", "require_tables", "require_writable", "tables_missing"]


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


_READ_ONLY_SETTING = {
    "postgresql": "SHOW transaction_read_only",
    "mysql": "SELECT @@session.transaction_read_only",  # MySQL 8 has no tx_read_only
    "mariadb": "SELECT @@session.tx_read_only",  # MariaDB before 11.1 has only this one
}
"""How each database says a session's transactions are read-only (a replica, a reader
endpoint, ``default_transaction_read_only``)."""


def require_writable(connection: Connection, db_url: str | None = None) -> None:
    """Raise :func:`read_only`'s error if the connection's transactions cannot write: a
    start-up check that only reads would pass on a replica, and every message would then
    be given back, forever."""
    dialect = connection.dialect
    name = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
    query = _READ_ONLY_SETTING.get(name)
    if query is None:
        return
    value = connection.exec_driver_sql(query).scalar()
    if str(value).lower() in ("on", "1", "true"):
        raise read_only(db_url, "its transactions are read-only")


def read_only(db_url: str | None, detail: str) -> DatabaseUnavailable:
    """The error for a database that refuses writes (the URL masked)."""
    where = mask_url(db_url) if db_url else "URL"
    return DatabaseUnavailable(
        f"the database at {where} is read-only ({detail}): a replica or reader endpoint, or "
        "read-only sessions; point its URL at the primary (writer) database (outboxer's "
        "commands: --db / OUTBOXER_DB)"
    )
