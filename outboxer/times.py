"""The times outboxer takes from a delivery: aware, and a day inside the calendar's ends.

A delivery's time is text (``outboxer-occurred-at``, ``outboxer-first-failed-at``) that
anyone who can publish writes. ``0001-01-01T00:00:00+14:00`` is valid ISO 8601 with a
zone, yet in UTC it is a day of the year 0: Python cannot hold it in UTC, and PostgreSQL
stores it as ``0001-12-31 10:00:00+00 BC``, which no read can load again (psycopg raises
``DataError``). PostgreSQL also shows a time in the session's time zone, up to a day from
UTC: ``0001-01-01T05:00Z`` is BC for a session at UTC-5. So outboxer takes only the times
whose UTC date is between 0001-01-02 and 9999-12-30 (:data:`EARLIEST`, :data:`LATEST`),
which every database, every time zone and Python hold alike.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

__all__ = ["ABOVE", "BELOW", "EARLIEST", "LATEST", "STORED_TIMES", "aware_utc", "in_utc"]

EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc)
"""The earliest time outboxer takes."""
LATEST = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=timezone.utc)
"""The latest time outboxer takes."""
BELOW = EARLIEST - timedelta(microseconds=1)
"""What PostgreSQL reads of a stored time before :data:`EARLIEST` (a row written by an
older outboxer, or by hand): still a time every session and Python can hold."""
ABOVE = LATEST + timedelta(microseconds=1)
"""What PostgreSQL reads of a stored time after :data:`LATEST` (``infinity`` too)."""

STORED_TIMES = (
    "from 0001-01-02 to 9999-12-30 in UTC, a day inside the calendar's ends, so that every "
    "time zone can show them"
)
"""For messages: "outboxer takes times {STORED_TIMES}"."""


def in_utc(moment: datetime) -> datetime | None:
    """The aware ``moment`` in UTC, or None when it is outside :data:`EARLIEST` to
    :data:`LATEST` (a UTC date that Python cannot even hold included)."""
    try:
        utc = moment if moment.tzinfo is timezone.utc else moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        return None
    return utc if EARLIEST <= utc <= LATEST else None


def aware_utc(raw: object) -> datetime | None:
    """The ISO 8601 time with a zone ``raw`` in UTC; None when it is missing, no such
    time, without a zone, or outside the times outboxer takes (see :func:`in_utc`)."""
    if not raw or not isinstance(raw, str):
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return in_utc(moment) if moment.tzinfo is not None else None
