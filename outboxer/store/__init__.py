"""All of outboxer's SQL lives in this package.

The producer hooks, the relay, the consumer and the dead-letter API call the named
operations here (``insert_messages``, ``claim_batch``, ``settle``, ``record_inbox``...);
none of them builds SQL of its own.
"""

from __future__ import annotations

from .clock import db_now, db_now_plus, read_db_now
from .outbox import NOTIFY_CHANNEL, NewMessage, check_size, insert_messages, learn_statement_limit

__all__ = [
    "NOTIFY_CHANNEL",
    "NewMessage",
    "check_size",
    "db_now",
    "db_now_plus",
    "insert_messages",
    "learn_statement_limit",
    "read_db_now",
]
