"""Publish overhead: an ORM transaction that inserts one row and publishes one event,
over the same transaction without the event, on PostgreSQL (target <= 1.25x)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Integer, String
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

        variants = {
            "event": publishing(Session),
            "event, no NOTIFY": publishing(Quiet),
            "one-column INSERT": with_tiny_insert,
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
            for name, run_round in order:
                elapsed = timed(run_round)
                times[name].append(elapsed / per_round * 1e6)
                ratios[name].append(elapsed / base)
            times["base"].append(base / per_round * 1e6)
        engine.dispose()

    def detail(name: str) -> str:
        return (
            f"{median(times[name]):.0f} us vs {median(times['base']):.0f} us per transaction, "
            f"{rounds} rounds x {per_round}"
        )

    ratio = median(ratios["event"])
    quiet = median(ratios["event, no NOTIFY"])
    floor = median(ratios["one-column INSERT"])
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
    ]
