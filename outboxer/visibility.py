"""Keeping held deliveries visible: what a consumer holds must not come back meanwhile.

An SQS message that a consumer received comes back to any consumer once its queue's
visibility timeout has passed, even while a handler still works on it or it waits for a
worker. Side by side with receiving, :func:`keep_visible` extends every delivery held
longer than ``extend_after`` seconds (or than half the queue's visibility timeout, if
that is shorter) by ``extend_by`` seconds, until it is cancelled (after the runner has
drained). A broker without visibility (RabbitMQ holds a delivery until it is settled)
ignores the extension.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from .redaction import one_line
from .transports.base import Delivery

__all__ = ["MIN_EXTEND_AFTER", "extend_all", "keep_visible"]

log = logging.getLogger("outboxer.consumer")

MIN_EXTEND_AFTER = 0.5
"""Seconds a delivery is held at least before its visibility is extended (a queue whose
visibility timeout is shorter than twice this redelivers whatever the consumer does)."""


async def keep_visible(
    held: dict[Delivery, float], visibility: float | None, extend_after: float, extend_by: float
) -> None:
    """Extend every delivery of ``held`` (each with when it was received or last
    extended) held longer than ``extend_after`` (in progress or waiting), or than half the
    queue's ``visibility`` timeout if that is shorter; runs until cancelled.

    ``held`` is the runner's own, touched by the event loop's thread only."""
    after = extend_after
    if visibility is not None:
        after = min(after, max(MIN_EXTEND_AFTER, visibility / 2))
    while True:
        await asyncio.sleep(min(1.0, after / 2))
        now = time.monotonic()
        due = [d for d, since in held.items() if now - since >= after]
        if not due:
            continue
        for delivery in due:
            held[delivery] = now
        await asyncio.to_thread(extend_all, due, extend_by)


def extend_all(deliveries: Sequence[Delivery], seconds: float) -> None:
    """Extend each of ``deliveries`` by ``seconds``, with as few broker calls as their
    brokers allow (grouped by class, as :func:`~outboxer.transports.base.acknowledge`
    does); a failure is one warning line.

    A class whose ``extend_many`` is its own (SQS: ten a call) extends its group; one
    without (the default calls :meth:`~outboxer.transports.base.Delivery.extend` once
    each, and the first failure would leave the rest) goes one by one here. A broker
    without visibility (RabbitMQ: neither is overridden) costs nothing."""
    kinds: dict[type, list[Delivery]] = {}
    for delivery in deliveries:
        kinds.setdefault(type(delivery), []).append(delivery)
    for kind, group in kinds.items():
        own_extend = getattr(kind, "extend", None) is not Delivery.extend
        together = getattr(kind, "extend_many", None)
        if together is not None and _overrides(together, Delivery.extend_many):
            try:
                together(group, seconds)
                continue
            except Exception as exc:
                log.debug("extending %d together failed (%s); one by one", len(group), exc)
        elif not own_extend:
            continue  # nothing to extend
        _one_by_one(group, seconds)


def _overrides(method: Any, base: Any) -> bool:
    """Whether the classmethod ``method`` (bound) is not ``base``'s (bound) own."""
    return getattr(method, "__func__", method) is not getattr(base, "__func__", base)


def _one_by_one(deliveries: Sequence[Delivery], seconds: float) -> None:
    for delivery in deliveries:
        try:
            delivery.extend(seconds)
        except Exception as exc:
            log.warning("could not extend a held message's visibility (%s)", one_line(exc))
            log.debug("extending failed", exc_info=True)
