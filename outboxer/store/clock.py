"""The database clock.

Due times, leases and backoff are computed on the database server's clock, so relays
and producers on hosts with skewed clocks agree. SQLite is embedded: its clock is this
process's, passed as a parameter.

Statements on the hot paths are built once and reused, so the clock appears in them as
expressions with bind parameters: :func:`now` and :func:`later` build them, and
:func:`clock_params` gives the values for one execution.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import BigInteger, Float, bindparam, func, literal_column, select, type_coerce
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.elements import ColumnElement

from ..checks import MAX_DURATION
from ..tables import UTCDateTime

__all__ = ["bounded", "clock_params", "db_now", "db_now_plus", "later", "now", "read_db_now"]

_NOW = "clock_now"


def now(dialect_name: str) -> ColumnElement[datetime]:
    """The current time on the database server, for a statement built once."""
    expr: ColumnElement[Any]
    if dialect_name == "postgresql":
        # statement_timestamp(): when this statement started, not the transaction.
        expr = func.statement_timestamp()
    elif dialect_name in ("mysql", "mariadb"):
        expr = func.utc_timestamp(literal_column("6"))
    else:
        return bindparam(_NOW, type_=UTCDateTime())
    return type_coerce(expr, UTCDateTime())


def bounded(seconds: float) -> float:
    """``seconds`` within +/- :data:`~outboxer.checks.MAX_DURATION` (100 years): a time
    further away overflows the date arithmetic of every database (PostgreSQL's interval,
    MariaDB's DATETIME, Python's datetime on SQLite), an error that would read as
    database trouble. Settings are refused past it where they are given; this is the
    last guard, for a computed value."""
    if math.isnan(seconds):
        raise ValueError("a duration of nan seconds")
    return max(-MAX_DURATION, min(float(seconds), MAX_DURATION))


def later(
    dialect_name: str, name: str | None, seconds: float | None = None
) -> ColumnElement[datetime]:
    """The server's current time plus the seconds given as parameter ``name``.

    With ``seconds``, the value is bound now (``name`` may then be None: an anonymous
    parameter), for statements built for one execution. Seconds are :func:`bounded`.
    """
    expr: ColumnElement[Any]
    if seconds is not None:
        seconds = bounded(seconds)
    if dialect_name == "postgresql":
        offset = bindparam(name, seconds, type_=Float(), unique=name is None)
        expr = func.statement_timestamp() + offset * literal_column("interval '1 second'")
    elif dialect_name in ("mysql", "mariadb"):
        microseconds = None if seconds is None else round(seconds * 1_000_000)
        offset = bindparam(name, microseconds, type_=BigInteger(), unique=name is None)
        expr = func.timestampadd(
            literal_column("MICROSECOND"), offset, func.utc_timestamp(literal_column("6"))
        )
    else:
        moment = (
            None if seconds is None else datetime.now(timezone.utc) + timedelta(seconds=seconds)
        )
        return bindparam(name, moment, type_=UTCDateTime(), unique=name is None)
    return type_coerce(expr, UTCDateTime())


def clock_params(dialect_name: str, **seconds: float) -> dict[str, Any]:
    """Values for :func:`now` and for :func:`later` parameters (name=seconds from now,
    :func:`bounded`)."""
    seconds = {name: bounded(value) for name, value in seconds.items()}
    if dialect_name == "postgresql":
        return {name: float(value) for name, value in seconds.items()}
    if dialect_name in ("mysql", "mariadb"):
        return {name: round(value * 1_000_000) for name, value in seconds.items()}
    current = datetime.now(timezone.utc)
    params: dict[str, Any] = {_NOW: current}
    params.update({name: current + timedelta(seconds=value) for name, value in seconds.items()})
    return params


def db_now(dialect: Dialect) -> ColumnElement[datetime]:
    """An SQL expression for the current time on the database server (rarely run SQL)."""
    if dialect.name not in ("postgresql", "mysql", "mariadb"):
        return bindparam(None, datetime.now(timezone.utc), type_=UTCDateTime(), unique=True)
    return now(dialect.name)


def db_now_plus(dialect: Dialect, seconds: float) -> ColumnElement[datetime]:
    """An SQL expression for the server's current time plus ``seconds`` (rarely run SQL)."""
    return later(dialect.name, None, seconds)


def read_db_now(connection: Connection) -> datetime:
    """The database server's current time, as an aware UTC datetime."""
    value: datetime = connection.execute(select(db_now(connection.dialect))).scalar_one()
    return value
