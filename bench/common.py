"""Shared benchmark helpers: throwaway databases, timing, medians, result tables."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

console = Console(soft_wrap=True)

PG_SERVER = os.environ.get("OUTBOXER_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBITMQ_URL = os.environ.get("OUTBOXER_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")


@contextmanager
def fresh_postgres(prefix: str = "outboxer_bench") -> Iterator[str]:
    """A new empty PostgreSQL database for one benchmark; dropped afterwards."""
    admin = create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(PG_SERVER).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def engine_for(url: str, **kwargs: object) -> Engine:
    return create_engine(url, **kwargs)  # type: ignore[arg-type]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Figure:
    """One printed benchmark line: a ratio (or value) against its target."""

    name: str
    value: float
    unit: str
    target: str
    passed: bool
    detail: str = ""
    samples: list[float] = field(default_factory=list)


def median(values: list[float]) -> float:
    return statistics.median(values)


def print_figures(title: str, figures: list[Figure]) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("median", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")
    table.add_column("detail")
    for f in figures:
        value = f"{f.value:.2f}{f.unit}" if f.unit == "x" else f"{f.value:.1f} {f.unit}"
        verdict = "" if not f.target else ("[green]ok[/]" if f.passed else "[red]miss[/]")
        table.add_row(f.name, value, f.target, verdict, f.detail)
    console.print(table)
