"""Retry policies: pure functions of an attempt number, an error and a random source.

:class:`Backoff` spaces out retries (exponential, jittered, each delay capped).
:class:`Retry` is a handler's policy: how many runs, which errors, how many of the
retries happen at once in process before the rest are delayed. :class:`CircuitBreaker`
stops a relay from spending attempts while the broker is down. No clocks are read
here; callers pass times in, so tests drive every decision.
"""

from __future__ import annotations

import enum
import math
import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .checks import MAX_DURATION, too_long
from .errors import RetryConfigError

__all__ = ["Backoff", "CircuitBreaker", "Decision", "Retry", "Verdict"]

Random = Callable[[], float]


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number ``n``: ``initial * multiplier**(n-1)``, +/- ``jitter``,
    never more than ``max_delay`` (the cap limits each delay; it does not stop retrying)."""

    initial: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name in ("initial", "multiplier", "max_delay", "jitter"):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and not isinstance(value, bool),
                f"{name} must be a number of seconds or a factor, got {value!r}",
            )
        _check(self.initial > 0 and math.isfinite(self.initial), "initial delay must be > 0")
        _check(self.initial <= MAX_DURATION, too_long("initial delay", self.initial))
        _check(
            self.multiplier >= 1 and math.isfinite(self.multiplier),
            f"multiplier must be a finite number >= 1, got {self.multiplier!r}",
        )
        _check(
            not math.isnan(self.max_delay),
            f"max_delay must be a number of seconds, got {self.max_delay!r}",
        )
        _check(self.max_delay >= self.initial, "max_delay must be >= the initial delay")
        _check(self.max_delay <= MAX_DURATION, too_long("max_delay", self.max_delay))
        _check(0 <= self.jitter <= 1, "jitter must be between 0 and 1")

    def delay(self, retry_number: int, random: Random = _random.random) -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry), never
        more than ``max_delay`` however large the number (the growth is capped before it
        can overflow a float, and so before any date arithmetic)."""
        exponent = max(retry_number - 1, 0)
        try:
            grown = self.initial * self.multiplier ** min(exponent, 1000)
        except OverflowError:  # 1e300 ** 2: past any cap
            grown = math.inf
        base = min(grown, self.max_delay)
        spread = base * self.jitter * (2 * random() - 1)
        return max(0.0, min(base + spread, self.max_delay))


class Verdict(enum.Enum):
    RETRY_NOW = "retry_now"
    RETRY_LATER = "retry_later"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Decision:
    """What to do after a handler run failed."""

    verdict: Verdict
    delay: float = 0.0
    reason: str = ""
    """For GIVE_UP: ``non_retryable`` or ``exhausted``."""


_DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True, init=False)
class Retry:
    """A handler's retry policy.

    ``max_attempts`` counts every run of the handler, the first included;
    ``max_retries`` is the alternative that counts only the runs after the first (as
    Ecotone's ``maxAttempts`` and Celery's ``max_retries`` do): ``max_retries=2`` is
    ``max_attempts=3``. Give one of them, not both (the default is ``max_attempts=3``).
    After a failure, the first ``instant`` retries run at once, in process; later ones
    travel through the outbox after ``initial_delay * multiplier**k`` seconds (jittered
    by ``jitter``, each capped at ``max_delay``). Only exceptions that are instances of
    ``retry_on`` are retried; any other goes straight to the dead letter table.
    """

    max_attempts: int
    initial_delay: float
    multiplier: float
    max_delay: float
    jitter: float
    retry_on: tuple[type[BaseException], ...]
    instant: int
    _backoff: Backoff = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        max_attempts: int | None = None,
        initial_delay: float = 1.0,
        multiplier: float = 2.0,
        max_delay: float = 300.0,
        jitter: float = 0.1,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] = (Exception,),
        instant: int = 0,
        *,
        max_retries: int | None = None,
    ) -> None:
        if max_attempts is not None and max_retries is not None:
            raise RetryConfigError(
                f"Retry(max_attempts={max_attempts!r}, max_retries={max_retries!r}): give one "
                "of them (max_attempts counts every run, max_retries the runs after the "
                "first; max_retries=N is max_attempts=N+1)"
            )
        if max_retries is not None:
            _check(
                _whole(max_retries) and max_retries >= 0,
                f"max_retries must be a whole number >= 0 (it counts the runs after the "
                f"first), got {max_retries!r}",
            )
            max_attempts = max_retries + 1
        elif max_attempts is None:
            max_attempts = _DEFAULT_MAX_ATTEMPTS
        values = {
            "max_attempts": max_attempts,
            "initial_delay": initial_delay,
            "multiplier": multiplier,
            "max_delay": max_delay,
            "jitter": jitter,
            "retry_on": retry_on,
            "instant": instant,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._validate(counted_as="max_retries" if max_retries is not None else "max_attempts")

    @property
    def max_retries(self) -> int:
        """The runs allowed after the first: ``max_attempts - 1``."""
        return self.max_attempts - 1

    def _validate(self, counted_as: str) -> None:
        _check(
            _whole(self.max_attempts) and self.max_attempts >= 1,
            f"max_attempts must be a whole number >= 1 (it counts the first run; "
            f"max_retries=0 is the same as max_attempts=1), got {self.max_attempts!r}",
        )
        _check(
            _whole(self.instant) and self.instant >= 0,
            f"instant must be a whole number >= 0, got {self.instant!r}",
        )
        if counted_as == "max_retries":
            _check(
                self.instant <= self.max_retries,
                f"instant={self.instant} retries need max_retries >= {self.instant}, "
                f"got {self.max_retries}",
            )
        _check(
            self.instant < self.max_attempts,
            f"instant={self.instant} retries need max_attempts >= {self.instant + 1} "
            f"(max_attempts counts every run, the first included), got {self.max_attempts}",
        )
        retry_on: Any = self.retry_on
        if isinstance(retry_on, type):  # one class given instead of a tuple
            retry_on = (retry_on,)
            object.__setattr__(self, "retry_on", retry_on)
        _check(
            isinstance(retry_on, tuple)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on),
            f"retry_on must be exception classes, got {self.retry_on!r}",
        )
        for name in ("initial_delay", "multiplier", "max_delay", "jitter"):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and not isinstance(value, bool),
                f"{name} must be a number, got {value!r}",
            )
        try:
            backoff = Backoff(self.initial_delay, self.multiplier, self.max_delay, self.jitter)
        except RetryConfigError as exc:
            raise RetryConfigError(f"Retry: {exc}") from None
        object.__setattr__(self, "_backoff", backoff)

    def decide(
        self, attempt: int, error: BaseException, random: Random = _random.random
    ) -> Decision:
        """The decision after run number ``attempt`` (1-based) failed with ``error``."""
        if not isinstance(error, self.retry_on):
            return Decision(Verdict.GIVE_UP, reason="non_retryable")
        if attempt >= self.max_attempts:
            return Decision(Verdict.GIVE_UP, reason="exhausted")
        if attempt <= self.instant:
            return Decision(Verdict.RETRY_NOW)
        return Decision(
            Verdict.RETRY_LATER, delay=self._backoff.delay(attempt - self.instant, random)
        )


@dataclass
class CircuitBreaker:
    """Open while the broker is unreachable; half-open probes after a growing pause.

    While open, the relay sends nothing and counts no attempts: an outage must not turn
    good messages into dead letters.
    """

    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 2.0, 4.0, 0.2))
    """0.5 s doubling to 4 s: a probe is one connection attempt, and a broker that comes
    back is used again within seconds."""
    failures: int = 0
    open_until: float = 0.0

    def record_unavailable(self, now: float, random: Random = _random.random) -> float:
        """The broker was unreachable at ``now``; returns how long to stay open."""
        self.failures += 1
        pause = self.backoff.delay(self.failures, random)
        self.open_until = now + pause
        return pause

    def record_success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def remaining(self, now: float) -> float:
        """Seconds until the next probe is allowed (0 when closed or half-open)."""
        return max(0.0, self.open_until - now)

    @property
    def is_open(self) -> bool:
        return self.failures > 0


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RetryConfigError(message)
