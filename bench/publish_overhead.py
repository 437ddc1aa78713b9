"""Publish overhead: an ORM transaction that inserts one row and publishes one event,
over the same transaction without the event, on PostgreSQL (target <= 1.25x).

Issue 12's stretch question, whether sending the outbox INSERT in the same round trip as
the COMMIT (psycopg 3's pipeline mode) would reach the target, is measured on the raw
driver in the same rounds: one row and COMMIT; the same plus the outbox INSERT (with its
``pg_notify``) as its own round trip; and the same with that INSERT and the COMMIT sent
together in a pipeline. outboxer does not pipeline (see docs/benchmarks.md)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from sqlalchemy import Integer, String
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import outboxer

from .common import Figure, engine_for, fresh_postgres, median, timed


class _Base(DeclarativeBase):
    pass


class BenchTiny(_Base):
    """A one-column table: the cost of any extra INSERT, for reference."""

    __tablename__ = "bench_tiny"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)


class BenchOrder(_Base):
    __tablename__ = "bench_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))


@outboxer.message("bench.order_placed", destination="bench-orders", key="order_id")
@dataclass
class BenchOrderPlaced:
    order_id: int
    customer: str


def run(rounds: int = 7, per_round: int = 400) -> list[Figure]:
    with fresh_postgres() as url:
        engine = engine_for(url, pool_size=1)
        outboxer.create_all(engine)
        _Base.metadata.create_all(engine)
        Session = sessionmaker(engine, class_=outboxer.OutboxSession)

        class QuietSession(outboxer.OutboxSession):
            outboxer_notify = False

        Quiet = sessionmaker(engine, class_=QuietSession)
        ids = itertools.count(1)

        def without_event() -> None:
            for _ in range(per_round):
                with Session.begin() as session:
                    session.add(BenchOrder(id=next(ids), customer="ada"))

        def publishing(factory: sessionmaker[outboxer.OutboxSession]) -> Callable[[], None]:
            def run_round() -> None:
                for _ in range(per_round):
                    with factory.begin() as session:
                        order_id = next(ids)
                        session.add(BenchOrder(id=order_id, customer="ada"))
                        session.publish(BenchOrderPlaced(order_id=order_id, customer="ada"))

            return run_round

        def with_tiny_insert() -> None:
            for _ in range(per_round):
                with Session.begin() as session:
                    session.add(BenchOrder(id=next(ids), customer="ada"))
                    session.add(BenchTiny())

        raw = psycopg.connect(
            make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        outbox_insert = (
            "INSERT INTO outboxer_outbox (message_id, message_type, destination, message_key,"
            " payload, occurred_at, available_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " RETURNING pg_notify('outboxer_bench', '')"
        )

        def raw_round(outbox: str) -> Callable[[], None]:
            """On the raw driver: one row, plus the outbox INSERT ``outbox`` ("no", "own
            round trip", "pipelined" with the COMMIT), and COMMIT."""

            def run_round() -> None:
                for _ in range(per_round):
                    order_id = next(ids)
                    with raw.cursor() as cursor:
                        cursor.execute(
                            "INSERT INTO bench_orders (id, customer) VALUES (%s, %s)",
                            (order_id, "ada"),
                        )
                        if outbox == "no":
                            raw.commit()
                            continue
                        now = datetime.now(timezone.utc)
                        row = (uuid.uuid4(), "bench.order_placed", "bench-orders",
                               str(order_id), b'{"order_id": 1}', now, now)  # fmt: skip
                        if outbox == "pipelined":
                            with raw.pipeline():
                                cursor.execute(outbox_insert, row)
                                raw.commit()
                        else:
                            cursor.execute(outbox_insert, row)
                            raw.commit()

            return run_round

        variants = {
            "event": publishing(Session),
            "event, no NOTIFY": publishing(Quiet),
            "one-column INSERT": with_tiny_insert,
            "raw base": raw_round("no"),
            "raw outbox INSERT": raw_round("own round trip"),
            "raw outbox INSERT pipelined": raw_round("pipelined"),
        }
        times: dict[str, list[float]] = {name: [] for name in ["base", *variants]}
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        for run_round in (without_event, *variants.values()):
            run_round()  # warm-up: connections, statement caches
        for i in range(rounds):
            # Alternate the order, so drift on this noisy machine hits every variant alike.
            order = list(variants.items())
            if i % 2:
                order.reverse()
            base = timed(without_event)
            elapsed_by_name = {}
            for name, run_round in order:
                elapsed = timed(run_round)
                elapsed_by_name[name] = elapsed
                times[name].append(elapsed / per_round * 1e6)
                ratios[name].append(elapsed / base)
            # The raw variants against the raw transaction alone, in the same round.
            for name in ("raw outbox INSERT", "raw outbox INSERT pipelined"):
                ratios[name][-1] = elapsed_by_name[name] / elapsed_by_name["raw base"]
            times["base"].append(base / per_round * 1e6)
        raw.close()
        engine.dispose()

    def detail(name: str) -> str:
        return (
            f"{median(times[name]):.0f} us vs {median(times['base']):.0f} us per transaction, "
            f"{rounds} rounds x {per_round}"
        )

    ratio = median(ratios["event"])
    quiet = median(ratios["event, no NOTIFY"])
    floor = median(ratios["one-column INSERT"])
    raw_own = median(ratios["raw outbox INSERT"])
    raw_pipelined = median(ratios["raw outbox INSERT pipelined"])
    return [
        Figure(
            "publish overhead: tx + 1 event / tx alone (PostgreSQL)",
            ratio,
            "x",
            "<= 1.25x",
            ratio <= 1.25,
            detail("event"),
            ratios["event"],
        ),
        Figure(
            "  same, with NOTIFY off (relays poll)",
            quiet,
            "x",
            "",
            True,
            detail("event, no NOTIFY"),
        ),
        Figure(
            "  reference: tx + a one-column INSERT / tx alone",
            floor,
            "x",
            "",
            True,
            "the floor for any extra statement on this machine",
        ),
        Figure(
            "  raw psycopg: tx + outbox INSERT / tx alone",
            raw_own,
            "x",
            "",
            True,
            f"{median(times['raw outbox INSERT']):.0f} us vs "
            f"{median(times['raw base']):.0f} us per transaction",
            ratios["raw outbox INSERT"],
        ),
        Figure(
            "  raw psycopg: the outbox INSERT pipelined with COMMIT / tx alone",
            raw_pipelined,
            "x",
            "",
            True,
            f"{median(times['raw outbox INSERT pipelined']):.0f} us per transaction; "
            "not used by outboxer (docs/benchmarks.md)",
            ratios["raw outbox INSERT pipelined"],
        ),
    ]
