"""Deliveries kept through a database outage, instead of given back to the broker.

When a delivery's outcome cannot be recorded because the consumer's database cannot be
used (unreachable, restarting, read-only: what :func:`~outboxer.diagnosis.diagnose` names
for the operator), the message is not at fault. Giving it back (``basic.nack`` with
requeue, a zero visibility timeout) counts as a delivery on the broker: on a quorum queue
with a delivery limit the broker parks it in ``<queue>.poison`` after a few tries, and
RabbitMQ 4 gives every quorum queue a limit of 20. A long-running consumer therefore keeps
such a delivery and tries it again after the outage pause
(:data:`~outboxer.stopping.OUTAGE_BACKOFF`, growing with every failed try of the streak
and reset by the next success) for as long as the outage lasts; the deliveries it holds
stay visible (:mod:`outboxer.visibility`). A stop ends the pause at once and gives the
delivery back. ``once`` runs give back at once, as before.

A lost connection is not always an outage: a handler can lose its own (a statement that
makes the server drop it, a value over MariaDB's ``max_allowed_packet``, a
``pg_terminate_backend``), and kept, such a message would hold its worker forever. So
before keeping a delivery the consumer asks its database (``SELECT 1`` in a transaction of
its own): if it answers, the failure was the message's doing and the delivery is given
back, as before (a quorum queue's delivery limit then parks it). A database that refuses
writes is an outage without asking. Any other failure is given back as before too.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Connection

from .diagnosis import diagnose, refuses_writes
from .errors import OperatorError
from .processing import Processor
from .redaction import printable
from .stopping import OUTAGE_BACKOFF, StopSignal

__all__ = ["OutageHold"]

log = logging.getLogger("outboxer.consumer")


class OutageHold:
    """The outage streak of one run, shared by its workers."""

    def __init__(self, name: str, stop: StopSignal, processor: Processor, enabled: bool) -> None:
        self._name = name
        self._processor = processor
        self._stop = stop
        self._enabled = enabled
        self._lock = threading.Lock()
        self._tries = 0

    def pause(self, error: BaseException) -> float | None:
        """Seconds to wait before trying the delivery again, or None: give it back (a
        worker thread; it may ask the database)."""
        problem = self._outage(error)
        if problem is None or (not refuses_writes(error) and self._answers()):
            return None
        return self._count(problem, error)

    async def pause_async(self, error: BaseException) -> float | None:
        problem = self._outage(error)
        if problem is None or (not refuses_writes(error) and await self._answers_async()):
            return None
        return self._count(problem, error)

    def _answers(self) -> bool:
        """Whether the consumer's database takes a statement now."""
        try:
            self._processor.transaction_sync(_select_one)
        except Exception:
            return False
        return True

    async def _answers_async(self) -> bool:
        try:
            await self._processor.transaction_async(_select_one)
        except Exception:
            return False
        return True

    def _outage(self, error: BaseException) -> OperatorError | None:
        if not self._enabled or self._stop.is_set() or not isinstance(error, Exception):
            return None
        return diagnose(error)

    def _count(self, problem: OperatorError, error: BaseException) -> float:
        with self._lock:
            self._tries += 1
            tries = self._tries
        seconds = OUTAGE_BACKOFF.delay(tries)
        log.warning(
            "consumer %s could not record a message's outcome (%s); keeping it and trying "
            "again in %.1f s",
            self._name,
            printable(str(problem), 300),
            seconds,
        )
        if tries == 1:  # the traceback once per streak, at debug level
            log.debug("recording the outcome failed", exc_info=error)
        return seconds

    def wait(self, seconds: float) -> bool:
        """Block this worker thread for the pause; False if the run is stopping."""
        self._stop.wait(seconds)
        return not self._stop.is_set()

    async def wait_async(self, seconds: float) -> bool:
        await self._stop.sleep(seconds)
        return not self._stop.is_set()

    def over(self) -> None:
        """An outcome was recorded: the next failure starts a new streak."""
        if self._tries:
            with self._lock:
                self._tries = 0


def _select_one(connection: Connection) -> None:
    connection.exec_driver_sql("SELECT 1")
