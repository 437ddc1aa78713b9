"""Collector off: 1,000,000 messages published in one transaction, memory measured.

With ``outboxer_collector = False`` the session writes messages to the outbox as they are
published (500 a statement) instead of keeping them until commit; its resident memory
should stay flat whatever the transaction's size. Prints RSS before, at the end of
publishing and after the commit, and the time taken, on PostgreSQL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import outboxer

from .common import Figure, engine_for, fresh_postgres


@outboxer.message("bench.line_added", destination="bench-lines", key="order_id")
@dataclass
class BenchLineAdded:
    order_id: int
    sku: str


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 1e6


def run(messages: int = 1_000_000, warm_up: int = 10_000, quick: bool = False) -> list[Figure]:
    if quick:
        messages = 100_000

    class BulkSession(outboxer.OutboxSession):
        outboxer_collector = False
        outboxer_notify = False

    with fresh_postgres() as url:
        engine = engine_for(url, pool_size=1)
        outboxer.create_all(engine)
        with BulkSession(engine) as session:
            for i in range(warm_up):
                session.publish(BenchLineAdded(order_id=i % 1000, sku=f"sku-{i}"))
            before = _rss_mb()
            start = time.perf_counter()
            for i in range(warm_up, messages):
                session.publish(BenchLineAdded(order_id=i % 1000, sku=f"sku-{i}"))
            published = _rss_mb()
            session.commit()
            elapsed = time.perf_counter() - start
        after = _rss_mb()
        engine.dispose()
    growth = published - before
    return [
        Figure(
            f"collector off: RSS growth over {messages - warm_up:,} publishes in one transaction",
            growth,
            "MB",
            "<= 20 MB",
            growth <= 20,
            f"RSS {before:.0f} MB before, {published:.0f} MB after publishing, {after:.0f} MB "
            f"after commit; {elapsed:.0f} s ({messages / elapsed:,.0f} messages/s)",
        )
    ]
