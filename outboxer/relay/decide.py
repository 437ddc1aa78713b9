"""What to do with each row of a sent batch: pure decisions, no I/O, no clocks.

:func:`decide` turns a batch's send results into the rows to delete, retry with backoff,
dead-letter or hand back, and names the keys whose later rows must not be sent before
the failed ones (the ordering rule, see :mod:`outboxer.relay.pipeline`). The relay loop
applies the circuit breaker, spans, logs and the database writes.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..retry import Backoff
from ..store.relay import Claimed, DeadLetterRow, RetryRow
from ..transports.base import HELD_BACK, Outcome, SendResult

__all__ = ["DEFAULT_BACKOFF", "Decisions", "SendPolicy", "decide"]

DEFAULT_BACKOFF = Backoff(initial=1.0, multiplier=2.0, max_delay=300.0, jitter=0.2)

UNROUTABLE = "unroutable"


@dataclass(frozen=True)
class SendPolicy:
    """How many times a row is sent before it is dead-lettered, and how far apart.

    ``max_attempts`` counts failed sends (a broker outage does not count). A message the
    broker cannot route (no queue bound for it yet: the consumer has not started) is
    retried too, but only ``unroutable_attempts`` times: it is usually a deployment order
    that fixes itself in seconds, and otherwise a mistake to show in the dead letters soon.
    """

    max_attempts: int = 10
    backoff: Backoff = DEFAULT_BACKOFF
    unroutable_attempts: int = 5


@dataclass
class Decisions:
    """What a sent batch's results mean for its rows."""

    sent: list[int] = field(default_factory=list)
    retry: list[RetryRow] = field(default_factory=list)
    dead: list[DeadLetterRow] = field(default_factory=list)
    release: list[int] = field(default_factory=list)
    """Rows handed back untouched: the broker was unavailable."""
    held_keys: set[str] = field(default_factory=set)
    """Keys with a row that was not sent but will be again: nothing later of theirs may
    go before it."""
    unavailable: SendResult | None = None
    """The first UNAVAILABLE result, when there is one (the broker is down)."""
    unroutable_retries: int = 0


def decide(
    rows: Sequence[Claimed],
    results: Sequence[SendResult],
    policy: SendPolicy,
    random: Callable[[], float] = _random.random,
) -> Decisions:
    """The decision for each row of a batch, from its send result."""
    out = Decisions()
    for row, result in zip(rows, results, strict=True):
        outcome = result.outcome
        if outcome is Outcome.SENT:
            out.sent.append(row.id)
            continue
        if outcome is Outcome.UNAVAILABLE or result.error_type == HELD_BACK:
            # Not sent, through no fault of its own: handed back without an attempt.
            out.release.append(row.id)
            if outcome is Outcome.UNAVAILABLE and out.unavailable is None:
                out.unavailable = result
            _hold(out, row)
            continue
        attempts = row.attempts + 1
        error = result.error or result.error_type or "send failed"
        unroutable = result.error_type == UNROUTABLE
        limit = min(policy.unroutable_attempts, policy.max_attempts) if unroutable else None
        gives_up = (
            attempts >= (limit or policy.max_attempts)
            if outcome is Outcome.RETRY or unroutable
            else True
        )
        if gives_up:
            if outcome is Outcome.RETRY or unroutable:
                error = f"gave up after {_attempts(attempts)}; last error: {error}"
            out.dead.append(DeadLetterRow(row, result.error_type or "error", error, attempts))
            continue
        delay = policy.backoff.delay(attempts, random)
        out.retry.append(RetryRow(row.id, delay, f"{result.error_type}: {error}"))
        out.unroutable_retries += int(unroutable)
        _hold(out, row)
    return out


def _hold(out: Decisions, row: Claimed) -> None:
    if row.envelope.key is not None:
        out.held_keys.add(row.envelope.key)


def _attempts(n: int) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"
