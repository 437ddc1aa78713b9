"""Start-up checks of the long-running commands, and the readiness probe's checks.

Before ``outboxer relay`` or ``outboxer-inbox`` starts its loop it checks that the
database answers and holds outboxer's tables, and that the broker accepts a connection
with the credentials given. What happens when a check fails depends on the failure:

* **waitable** (database or broker unreachable): a long-running process waits for it,
  with backoff and one log line per attempt (an orchestrator may start it before its
  dependencies); a one-shot run (``--once``) exits with the failure's code at once;
* **permanent** (credentials refused, tables missing, invalid URL): exit at once with the
  failure's code; waiting would not fix it.

The same checks, run without waiting, are the HTTP readiness probe (:mod:`.health`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL, Engine

from .. import async_support
from ..diagnosis import diagnose
from ..errors import (
    BrokerAccessDenied,
    BrokerUnavailable,
    ConfigurationError,
    DatabaseAccessDenied,
    DatabaseUnavailable,
    OperatorError,
)
from ..retry import Backoff
from ..secrets import mask_url
from ..store.schema import require_tables
from ..transports import Transport

__all__ = [
    "Check",
    "async_database_check",
    "bound_url",
    "broker_check",
    "in_memory_sqlite",
    "database_check",
    "wait_until",
]

log = logging.getLogger("outboxer.cli")

Check = Callable[[], None]
"""Returns when the dependency is usable; raises an :class:`OperatorError` otherwise."""

STARTUP_BACKOFF = Backoff(1.0, 2.0, 30.0, 0.2)

_CHECK_SLICE = 0.2
"""How often a start-up check that has not answered yet looks for a stop."""

_QUIET_AFTER = 10.0
"""Seconds without an answer after which a start-up check says it is still waiting."""


def database_check(engine: Engine, db_url: str, tables: list[str] | None = None) -> Check:
    """Connect, and find the outboxer tables (those named, or all)."""

    def check() -> None:
        if in_memory_sqlite(engine.url):
            return  # the checks run in a thread of their own: its connection, its database
        try:
            with engine.connect() as connection:
                require_tables(connection, tables)
        except OperatorError:
            raise
        except Exception as exc:
            problem = diagnose(exc, db_url=db_url)
            if problem is None:
                raise
            raise problem from exc

    return check


def async_database_check(session_factory: Callable[[], Any]) -> Check:
    """:func:`database_check` for an ``async_sessionmaker``: SQLAlchemy's asyncio extension
    is installed (:class:`~outboxer.errors.ConfigurationError` naming the extra otherwise),
    and the database answers the async driver and holds outboxer's tables.

    Each check runs in an event loop of its own, on an engine of its own, disposed of
    after it: the application's pooled connections belong to the consumer's event loop,
    and the readiness probe runs in another thread. That engine connects as the
    application's does (a copy of its pool: the same ``connect_args`` and connect events).
    An in-memory SQLite database exists once per connection, so there only the extension
    is checked.
    """

    def check() -> None:
        if not async_support.AVAILABLE:
            raise ConfigurationError(async_support.MISSING_HINT)
        url = bound_url(session_factory)
        if url is None or in_memory_sqlite(url):
            return
        try:
            asyncio.run(_probe(session_factory))
        except OperatorError:
            raise
        except Exception as exc:
            problem = diagnose(exc, db_url=url.render_as_string(hide_password=True))
            if problem is None:
                raise
            raise problem from exc

    return check


async def _probe(session_factory: Callable[[], Any]) -> None:
    from sqlalchemy.ext.asyncio import AsyncEngine

    bind = session_factory.kw["bind"]  # type: ignore[attr-defined]  # bound_url found it
    app = bind.sync_engine  # an AsyncEngine or an AsyncConnection
    engine = AsyncEngine(Engine(app.pool.recreate(), app.dialect, app.url, hide_parameters=True))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(require_tables)
    finally:
        await engine.dispose()


def in_memory_sqlite(url: URL) -> bool:
    """An in-memory SQLite database exists once per connection, and SQLAlchemy gives each
    thread its own: a check from another thread would see an empty database."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def bound_url(session_factory: Callable[[], Any]) -> URL | None:
    """The URL of the engine ``session_factory`` binds its sessions to (None: unbound)."""
    bind = getattr(session_factory, "kw", {}).get("bind")
    engine = getattr(bind, "engine", bind)  # a Connection, or an Engine (also async)
    url = getattr(engine, "url", None)
    return url if isinstance(url, URL) else None


def broker_check(transport: Transport, broker_url: str) -> Check:
    """Connect to the broker and authenticate."""

    def check() -> None:
        try:
            transport.check()
        except Exception as exc:
            # A failed check is the broker's fault even when no rule names the driver error.
            problem = diagnose(exc, broker_url=broker_url) or BrokerUnavailable(
                f"the broker check failed ({type(exc).__name__}: {exc}); is {mask_url(broker_url)} "
                "right?"
            )
            raise problem from exc

    return check


def wait_until(
    checks: list[Check],
    *,
    wait: bool,
    stop: threading.Event,
    backoff: Backoff = STARTUP_BACKOFF,
    tick: Callable[[], None] = lambda: None,
) -> bool:
    """Run ``checks`` until all pass (True) or ``stop`` is set (False).

    A permanent failure is raised at once; an unreachable dependency is raised too unless
    ``wait``, in which case it is logged (one line) and tried again after a backoff.
    ``tick`` is called before each attempt and while one lasts (a heartbeat: waiting is
    not being stuck). The checks run in a thread of their own, so that ``stop`` ends the
    wait at once even while a database or broker that accepted the connection answers
    nothing (a hung server, a pooler queueing the client): that thread is left behind.
    """
    attempt = 0
    while not stop.is_set():
        tick()
        try:
            if not _attempt(checks, stop, tick):
                return False
        except (DatabaseAccessDenied, BrokerAccessDenied):
            raise
        except (DatabaseUnavailable, BrokerUnavailable) as exc:
            if not wait:
                raise
            attempt += 1
            pause = backoff.delay(attempt)
            log.warning("%s (attempt %d; trying again in %.1f s)", exc, attempt, pause)
            stop.wait(pause)
            continue
        if attempt:
            log.info("the database and the broker are reachable; starting")
        return True
    return False


def _attempt(checks: list[Check], stop: threading.Event, tick: Callable[[], None]) -> bool:
    """Run ``checks`` in a daemon thread: True once they pass, False if ``stop`` came first;
    what they raised is raised here."""
    failed: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            for check in checks:
                check()
        except BaseException as exc:  # raised again in the caller's thread
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="outboxer-start-up-check", daemon=True).start()
    quiet_until = time.monotonic() + _QUIET_AFTER
    while not done.wait(_CHECK_SLICE):
        if stop.is_set():
            log.info("stopped while the start-up checks waited for an answer")
            return False
        if time.monotonic() >= quiet_until:
            quiet_until = float("inf")  # once per attempt
            log.warning(
                "no answer yet from the database or the broker after %.0f s; still waiting "
                "(a server that accepts connections but does not answer: overloaded, hung, or "
                "a pooler queueing clients; connect_timeout=<seconds> in a PostgreSQL URL "
                "bounds each try)",
                _QUIET_AFTER,
            )
        tick()
    if failed:
        raise failed[0]
    return True
