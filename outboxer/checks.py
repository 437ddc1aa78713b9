"""Checks of numeric settings, shared by the relay and the consumer: a wrong one raises
:class:`~outboxer.errors.ConfigurationError` naming the setting, at construction."""

from __future__ import annotations

import math

from .errors import ConfigurationError

__all__ = ["MAX_DURATION", "check_number"]

MAX_DURATION = 36500 * 86400.0
"""100 years: the longest duration outboxer takes (a command line option, ``publish(delay=)``).

A time that far ahead or ago is still a date on every database; ``1e12`` seconds would
overflow the date arithmetic it feeds (SQLite's datetime, MariaDB's TIMESTAMPADD,
PostgreSQL's interval)."""


def check_number(
    name: str,
    value: object,
    *,
    whole: bool = False,
    minimum: float | None = None,
    positive: bool = False,
) -> None:
    """ConfigurationError unless ``value`` is a number (``whole``: an int, not a bool) that
    is at least ``minimum`` and, with ``positive``, above 0 and finite (a duration in
    seconds: an infinite one overflows the waits and date arithmetic it feeds)."""
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
    if positive and math.isinf(number):
        raise ConfigurationError(
            f"{name} must be a finite number of seconds, got {value!r} (None, where the "
            "setting takes it, turns it off)"
        )
