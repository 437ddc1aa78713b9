"""Where a relay run's wall time goes: the relay's own steps, timed from outside.

``relay-rabbitmq`` says how fast the relay is and what each process's CPU costs; this
says what the relay waits for. For the length of the benchmark only, it wraps the relay's
steps with timers (the instance methods are restored afterwards; nothing in outboxer
changes): on the loop's thread, the time spent waiting for the next claim, encoding and
sending a batch, and waiting for a batch's confirms; on the database thread, the time
spent claiming and settling. Each is a share of the run's wall time (``relay.run(once=True)``
until the queue holds every message), the median of the rounds.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from outboxer.relay import pipeline, runner, tasks

from .common import Figure, median
from .relay import publish_rows, relay_to_rabbitmq

STEPS: tuple[tuple[Any, str, str], ...] = (
    (runner.Run, "_next_batch", "loop thread: waiting for the next claim"),
    (pipeline.Pipeline, "send", "loop thread: encoding and sending a batch"),
    (pipeline.Pipeline, "land", "loop thread: waiting for a batch's confirms"),
    (tasks.Tasks, "claim", "database thread: claiming (statement and rows)"),
    (tasks.Tasks, "settle", "database thread: settling (DELETE)"),
)


@contextmanager
def _timed(spent: Counter[str]) -> Iterator[None]:
    """Add each step's wall time to ``spent`` while the block runs."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in STEPS]

    def timer(original: Callable[..., Any], label: str) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started

        return step

    for (owner, name, label), (_, _, original) in zip(STEPS, originals, strict=True):
        setattr(owner, name, timer(original, label))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def run(rounds: int = 5, messages: int = 10_000) -> list[Figure]:
    shares: dict[str, list[float]] = {label: [] for _, _, label in STEPS}
    walls: list[float] = []
    with relay_to_rabbitmq() as rig:
        Session, rabbit, relay = rig.Session, rig.rabbit, rig.relay
        publish_rows(Session, rabbit.exchange, 500)
        relay.run(once=True)  # warm-up
        rabbit.purge()
        for _ in range(rounds):
            publish_rows(Session, rabbit.exchange, messages)
            spent: Counter[str] = Counter()
            with _timed(spent):
                started = time.perf_counter()
                stats = relay.run(once=True)
                rabbit.wait_for(messages)
                wall = time.perf_counter() - started
            assert stats.sent == messages, stats
            walls.append(wall)
            for label, values in shares.items():
                values.append(100 * spent[label] / wall)
            rabbit.purge()
    rate = median([messages / w for w in walls])
    return [
        Figure(
            label,
            median(values),
            "%",
            "",
            True,
            f"of the run's wall time; {rate:,.0f} msg/s, {rounds} rounds x {messages:,}",
            values,
        )
        for label, values in shares.items()
    ]
