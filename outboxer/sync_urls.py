"""The synchronous URL of an asyncio application's database.

The relay and the commands are synchronous. Given the URL of an asyncio application
(``postgresql+asyncpg://``, ``+psycopg_async``, ``sqlite+aiosqlite``, ``mysql+asyncmy``,
``+aiomysql``), they reach the same database through its synchronous driver (psycopg,
sqlite3, PyMySQL): :func:`sync_url`. An asyncpg URL's query is asyncpg's, not libpq's,
so it is translated: TLS is kept (``ssl`` is ``sslmode``), the rest of asyncpg's own
client settings dropped.
"""

from __future__ import annotations

import math

from sqlalchemy.engine import URL

__all__ = ["sync_url"]

_SYNC_DRIVERS = {
    "psycopg_async": "psycopg",
    "asyncpg": "psycopg",
    "aiosqlite": "pysqlite",
    "asyncmy": "pymysql",
    "aiomysql": "pymysql",
}
"""The synchronous driver for each asyncio one."""


_ASYNCPG_ONLY = frozenset(
    {
        "prepared_statement_cache_size",
        "prepared_statement_name_func",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "command_timeout",
    }
)
"""asyncpg's query settings of its own client (statement caches, a per-call timeout):
nothing for libpq; a psycopg connection refuses them ('invalid connection option')."""


def _libpq_query(parsed: URL) -> URL:
    """An asyncpg URL's query in libpq's words: ``ssl`` is libpq's ``sslmode`` (never
    dropped: the connection would go unencrypted), ``timeout`` its ``connect_timeout``
    (whole seconds), asyncpg's own client settings (:data:`_ASYNCPG_ONLY`) dropped."""
    query = {name: value for name, value in parsed.query.items() if name not in _ASYNCPG_ONLY}
    if "ssl" in query and "sslmode" not in query:
        query["sslmode"] = query.pop("ssl")
    timeout = query.get("timeout")
    if isinstance(timeout, str) and "connect_timeout" not in query:
        del query["timeout"]
        try:
            query["connect_timeout"] = str(max(1, math.ceil(float(timeout))))
        except ValueError:
            query["connect_timeout"] = timeout  # libpq names the bad value
    return parsed.set(query=query)


def sync_url(url: URL) -> URL:
    """``url`` with a synchronous driver (and, from asyncpg, libpq's query); a URL that
    names a synchronous driver already comes back as it is."""
    sync = _SYNC_DRIVERS.get(url.get_driver_name())
    if sync is None:
        return url
    if url.get_driver_name() == "asyncpg":
        url = _libpq_query(url)
    return url.set(drivername=f"{url.get_backend_name()}+{sync}")
