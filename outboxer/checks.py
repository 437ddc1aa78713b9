"""Checks of numeric settings, shared by the relay and the consumer: a wrong one raises
:class:`~outboxer.errors.ConfigurationError` naming the setting, at construction."""

from __future__ import annotations

import math

from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from .errors import ConfigurationError

__all__ = ["LIMIT_TEXT", "MAX_DURATION", "check_number", "pool_room", "too_long"]

MAX_DURATION = 36500 * 86400.0
"""100 years: the longest duration outboxer takes (a command line option, ``publish(delay=)``).

A time that far ahead or ago is still a date on every database; ``1e12`` seconds would
overflow the date arithmetic it feeds (SQLite's datetime, MariaDB's TIMESTAMPADD,
PostgreSQL's interval)."""


LIMIT_TEXT = "100 years (3153600000 seconds)"
""":data:`MAX_DURATION` in words, for error messages."""


def too_long(name: str, value: object) -> str:
    """The one-line refusal of a duration past :data:`MAX_DURATION`."""
    return (
        f"{name} must be at most {LIMIT_TEXT}, got {value!r}: a date that far away "
        "overflows the database's date arithmetic; use a shorter duration"
    )


def check_number(
    name: str,
    value: object,
    *,
    whole: bool = False,
    minimum: float | None = None,
    positive: bool = False,
    duration: bool = False,
) -> None:
    """ConfigurationError unless ``value`` is a number (``whole``: an int, not a bool) that
    is at least ``minimum`` and, with ``positive``, above 0. With ``positive`` or
    ``duration`` it is seconds: finite and at most :data:`MAX_DURATION` (an infinite or
    huge duration overflows the waits and date arithmetic it feeds)."""
    kinds: tuple[type, ...] = (int,) if whole else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        kind = "a whole number" if whole else "a number"
        raise ConfigurationError(f"{name} must be {kind}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]  # an int or a float, checked above
    if math.isnan(number):
        raise ConfigurationError(f"{name} must be a number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum:g}, got {value!r}")
    if positive and not number > 0:
        raise ConfigurationError(f"{name} must be > 0 seconds, got {value!r}")
    if (positive or duration) and math.isinf(number):
        raise ConfigurationError(
            f"{name} must be a finite number of seconds, got {value!r} (None, where the "
            "setting takes it, turns it off)"
        )
    if (positive or duration) and number > MAX_DURATION:
        raise ConfigurationError(too_long(name, value))


def pool_room(engine: Engine) -> tuple[int, str] | None:
    """How many connections ``engine``'s pool lends at once, and its settings as text
    (``pool_size=1, max_overflow=0``); None when it sets no limit (``NullPool``, an
    overflow of -1) or shares one connection (``StaticPool``)."""
    pool = engine.pool
    if not isinstance(pool, QueuePool) or pool._max_overflow < 0:
        return None
    return (
        pool.size() + pool._max_overflow,
        f"pool_size={pool.size()}, max_overflow={pool._max_overflow}",
    )
