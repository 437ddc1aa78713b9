"""Relay throughput after a million messages passed through the outbox, with retention on
and off, over a fresh table (target >= 0.9x each).

The million rows are inserted in bulk and then deleted (retention off) or moved to
``outboxer_sent`` (retention on) in chunks, as the relay does, so the tables carry the
same dead tuples and (with retention) kept rows as after a million real sends; the
measurement then relays fresh messages with the in-process broker, which isolates the
database's part of the cost.
"""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.relay import relay_engine
from outboxer.testing import MemoryBroker, MemoryTransport

from .common import Figure, console, engine_for, fresh_postgres, median
from .relay import publish_rows

_FILL = """
INSERT INTO outboxer_outbox (message_id, message_type, destination, message_key, payload,
                             headers, occurred_at, available_at)
SELECT gen_random_uuid(), 'bench.order_placed', 'bench-aged', 'k' || (n % 100),
       convert_to('{"order_id": ' || n || ', "customer": "ada", "amount": "12.50"}', 'UTF8'),
       '{"tenant":"acme"}', now(), now()
FROM generate_series(:start, :stop) AS n
"""


_COLUMNS = (
    "id, message_id, message_type, destination, message_key, payload, headers, content_type, "
    "correlation_id, causation_id, traceparent, tracestate, target_handler, occurred_at, attempts"
)
_MOVE = f"""
WITH moved AS (DELETE FROM outboxer_outbox RETURNING {_COLUMNS})
INSERT INTO outboxer_sent ({_COLUMNS}, sent_at) SELECT {_COLUMNS}, now() FROM moved
"""


class _Line:
    """A relay on one database, measured one round at a time."""

    def __init__(self, url: str, retention: float | None) -> None:
        self.engine = engine_for(url)
        self.relay_db = relay_engine(url)
        self.Session = sessionmaker(self.engine, class_=outboxer.OutboxSession)
        transport = MemoryTransport(MemoryBroker())
        self.relay = outboxer.Relay(self.relay_db, transport, retention=retention)
        publish_rows(self.Session, "bench-aged", 1000)
        self.relay.run(once=True)  # warm-up

    def rate(self, messages: int) -> float:
        publish_rows(self.Session, "bench-aged", messages)
        started = time.perf_counter()
        stats = self.relay.run(once=True)
        assert stats.sent == messages, stats
        return messages / (time.perf_counter() - started)

    def close(self) -> None:
        self.relay_db.dispose()
        self.engine.dispose()


def _age(url: str, total: int, retention: bool) -> None:
    """Put ``total`` messages through the table the way the relay leaves them."""
    engine = engine_for(url, isolation_level="AUTOCOMMIT")
    chunk = 50_000
    with engine.connect() as conn:
        for start in range(0, total, chunk):
            stop = min(start + chunk, total) - 1
            conn.execute(text(_FILL), {"start": start, "stop": stop})
            conn.execute(text(_MOVE if retention else "DELETE FROM outboxer_outbox"))
        # In service the million messages pass over hours, and autovacuum (tuned for this
        # table by the migration) removes the dead rows as they come; one VACUUM here
        # stands in for it instead of waiting for its next round.
        conn.execute(text("VACUUM (ANALYZE) outboxer_outbox"))
    engine.dispose()


def run(rounds: int = 5, messages: int = 10_000, aged: int = 1_000_000) -> list[Figure]:
    if rounds < 5:  # --quick
        aged = 200_000
    figures = []
    for retention in (False, True):
        label = "on" if retention else "off"
        keep = 7 * 24 * 3600.0 if retention else None
        with fresh_postgres() as fresh_url, fresh_postgres() as aged_url:
            for url in (fresh_url, aged_url):
                outboxer.create_all(engine_for(url))
            console.print(f"retention {label}: putting {aged:,} messages through the table...")
            started = time.perf_counter()
            _age(aged_url, aged, retention)
            console.print(f"  done in {time.perf_counter() - started:.0f} s")
            fresh, old = _Line(fresh_url, keep), _Line(aged_url, keep)
            try:
                # Alternate rounds, so a slow minute on this shared machine hits both.
                fresh_rates, aged_rates, ratios = [], [], []
                for _ in range(rounds):
                    fresh_rates.append(fresh.rate(messages))
                    aged_rates.append(old.rate(messages))
                    ratios.append(aged_rates[-1] / fresh_rates[-1])
            finally:
                fresh.close()
                old.close()
        ratio = median(ratios)
        figures.append(
            Figure(
                f"relay after {aged:,} messages / fresh table, retention {label}",
                ratio,
                "x",
                ">= 0.9x",
                ratio >= 0.9,
                f"{median(aged_rates):,.0f} vs {median(fresh_rates):,.0f} msg/s (PostgreSQL "
                f"vacuumed as autovacuum does, in-process broker), {rounds} alternating "
                f"rounds x {messages:,}",
                ratios,
            )
        )
    return figures
