"""Machine calibration, printed at the start and the end of ``make bench``.

The machine is shared and its speed swings: these three numbers tell a reader how fast it
was while the figures were taken (a CPU loop, ``SELECT 1`` round trips on PostgreSQL, and
one-row commits per second). They are not targets.
"""

from __future__ import annotations

import time

from sqlalchemy import create_engine, text

from .common import PG_SERVER, Figure


def _cpu_loop(seconds: float = 0.5) -> float:
    """Million iterations of a small Python loop per second."""
    count = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        total = 0
        for i in range(10_000):
            total += i * i
        count += 10_000
    return count / (time.perf_counter() - started) / 1e6


def _per_second(fn: object, seconds: float = 0.5) -> float:
    calls = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()  # type: ignore[operator]
        calls += 1
    return calls / (time.perf_counter() - started)


def run(when: str = "start") -> list[Figure]:
    engine = create_engine(PG_SERVER, pool_size=1)
    try:
        with engine.connect() as conn:
            conn.execute(text("CREATE TEMPORARY TABLE bench_calibrate (n int)"))
            conn.commit()
            select1 = _per_second(lambda: conn.execute(text("SELECT 1")).scalar())

            def commit() -> None:
                conn.execute(text("INSERT INTO bench_calibrate VALUES (1)"))
                conn.commit()

            commits = _per_second(commit)
    finally:
        engine.dispose()
    return [
        Figure(f"calibration ({when}): CPU loop", _cpu_loop(), "M it/s", "", True),
        Figure(f"calibration ({when}): SELECT 1", select1, "/s", "", True),
        Figure(f"calibration ({when}): one-row commits", commits, "/s", "", True),
    ]
