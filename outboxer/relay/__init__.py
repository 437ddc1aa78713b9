"""The relay: publishes outbox rows to the broker, in order per key, at least once.

:class:`Relay` (:mod:`.relay`) is the facade; :mod:`.runner` is its loop; :mod:`.pipeline`
keeps the ordering rule; :mod:`.decide` decides what a send result means for a row;
:mod:`.failures` calls ``on_failure`` for the rows it dead-letters; :mod:`.liveness` lets
a relay take a dead relay's rows over at once; :mod:`.database` runs the database work and
waits out outages; :mod:`.reports` holds the figures.
"""

from __future__ import annotations

from .database import DATABASE_BACKOFF
from .decide import DEFAULT_BACKOFF, SendPolicy
from .failures import SendFailure
from .relay import Relay, relay_engine
from .reports import BatchReport, RelayStats

__all__ = [
    "DATABASE_BACKOFF",
    "DEFAULT_BACKOFF",
    "BatchReport",
    "Relay",
    "RelayStats",
    "SendFailure",
    "SendPolicy",
    "relay_engine",
]
