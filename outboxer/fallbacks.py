"""Writing a message's outcome so that no message can make the write fail.

A write is a :class:`Write` request the processing steps yield (the driver runs its job
in a transaction of its own and sends back None, or the exception it raised), with
fallbacks: a retry that cannot be written becomes the handler's dead letter, a dead
letter that cannot be written becomes a quarantine row that needs nothing from the
message. Only when even that fails (or the connection was lost) is the database down:
then the error is raised and the delivery goes back to the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .diagnosis import refuses_writes, try_again
from .redaction import error_text, printable
from .store import dead_letters as dead_letter_store
from .store.dead_letters import NewDeadLetter

__all__ = ["Job", "Write", "first_written", "lost_database", "no_connection", "park", "park_jobs"]

log = logging.getLogger("outboxer.consumer")

Job = Callable[[Connection], Any]

_QUARANTINE_BYTES = 64 * 1024
"""What a quarantine row keeps of the body: the start, enough to recognise the message."""


def lost_database(error: BaseException) -> bool:
    """The database connection went away (restart, failover, network): an outage, not a
    handler failure. SQLAlchemy marks those errors ``connection_invalidated``."""
    return isinstance(error, DBAPIError) and error.connection_invalidated


def no_connection(error: BaseException) -> bool:
    """No connection could be opened (refused, "the database system is starting up", too
    many clients), none could be had from the engine's pool within its ``pool_timeout``
    (every one in use), or the database takes no write at all (a replica, a failed-over
    primary): the database is unusable, not refusing this row. SQLAlchemy raises the first
    kind with no statement."""
    if isinstance(error, PoolTimeout):
        return True
    return isinstance(error, DBAPIError) and (error.statement is None or refuses_writes(error))


@dataclass(frozen=True)
class Write:
    """I/O request: call ``job`` with a connection in a transaction of its own.

    The driver sends back None, or the exception the write raised (the steps decide).
    """

    job: Job


def park(consumer: str, row: NewDeadLetter, destination: str) -> Generator[Write, Any, int]:
    """Write ``row``; if the database refuses it, a quarantine row in its place."""
    return (yield from first_written(*park_jobs(consumer, row, destination)))


def park_jobs(consumer: str, row: NewDeadLetter, destination: str) -> tuple[Job, Job]:
    """The writes of ``row``: the dead letter, then the quarantine row in its place."""
    body = row.envelope.payload if row.envelope is not None else row.raw_body
    last_resort = dead_letter_store.quarantine(
        consumer=consumer,
        destination=destination,
        error_type="quarantined",
        error=(
            f"a message's dead letter could not be stored (origin {row.origin}, "
            f"{row.error_type}: {row.error_message[:500]}); only the first "
            f"{_QUARANTINE_BYTES} bytes of its {len(body)}-byte body are kept, see the "
            "consumer's log"
        ),
        payload=bytes(body[:_QUARANTINE_BYTES]),
    )
    return (
        partial(dead_letter_store.insert_dead_letters, rows=[row]),
        partial(dead_letter_store.insert_dead_letters, rows=[last_resort]),
    )


def first_written(*jobs: Job) -> Generator[Write, Any, int]:
    """Write the first of ``jobs`` the database takes; returns its index.

    A job the database refuses falls back to the next. A lost connection is tried
    once more first (a database restart passes; a message that breaks the connection,
    one larger than the server's packet limit, breaks it again), and so is a write the
    database asks to try again (a deadlock, a lock-wait timeout); twice, it is raised. A
    database that cannot be connected to refused nothing: its error is raised at once, the
    delivery goes back (falling back then would dead-letter the message for an outage
    once the server is back). When the last job fails too, that error is raised.
    """
    for index, job in enumerate(jobs):
        error: Exception | None = yield Write(job)
        if error is not None and (
            (lost_database(error) and not no_connection(error)) or try_again(error)
        ):
            error = yield Write(job)
        if error is None:
            return index
        if no_connection(error) or try_again(error):
            # The database is down, or asks to try again (a deadlock, a lock-wait timeout,
            # a shutdown): it did not refuse this row. Give the delivery back.
            raise error
        if index == len(jobs) - 1:
            raise error
        _log_fallback(error)
    raise AssertionError("no jobs to write")  # pragma: no cover


def _log_fallback(exc: BaseException) -> None:
    log.warning(
        "the database refused a row built from a message (%s); writing a simpler one",
        printable(f"{type(exc).__name__}: {error_text(exc).splitlines()[0] if str(exc) else ''}"),
    )
