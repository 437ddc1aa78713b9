"""Retention: a consumer's old inbox rows and dead letters, deleted in small batches.

A running consumer prunes every ``prune_interval`` seconds (:mod:`outboxer.runner`);
:meth:`outboxer.Consumer.prune` runs the same from a scheduled job or a shell.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Connection

from .store import dead_letters as dead_letter_store
from .store import inbox as inbox_store

__all__ = ["PRUNE_BATCH", "Retention"]

PRUNE_BATCH = 1000
"""Rows deleted per statement: short transactions, short locks."""

Job = Callable[[Connection], int]


class Retention:
    """Deletes ``consumer``'s inbox rows older than ``inbox`` seconds, and its dead letters
    older than ``dead_letters`` seconds when that is set, until ``stopped()`` says to stop.
    Another consumer's rows on the same database keep their own consumer's windows."""

    def __init__(
        self,
        inbox: float,
        dead_letters: float | None,
        stopped: Callable[[], bool],
        consumer: str | None = None,
    ) -> None:
        self.inbox = inbox
        self.dead_letters = dead_letters
        self.stopped = stopped
        self.consumer = consumer

    def jobs(self) -> list[Job]:
        """One statement per table, each deleting at most :data:`PRUNE_BATCH` rows."""
        jobs: list[Job] = [
            lambda c: inbox_store.prune_inbox(
                c, older_than=self.inbox, limit=PRUNE_BATCH, consumer=self.consumer
            )
        ]
        retention = self.dead_letters
        if retention is not None:
            jobs.append(
                lambda c: dead_letter_store.prune_dead_letters(
                    c, older_than=retention, limit=PRUNE_BATCH, consumer=self.consumer
                )
            )
        return jobs

    def prune(self, transaction: Callable[[Job], int]) -> tuple[int, int]:
        """Run the jobs, each in ``transaction`` until a batch comes back short;
        returns (inbox rows, dead letters) deleted."""
        counts = [0, 0]
        for index, job in enumerate(self.jobs()):
            while not self.stopped():
                pruned = transaction(job)
                counts[index] += pruned
                if pruned < PRUNE_BATCH:
                    break
        return counts[0], counts[1]

    async def prune_async(self, transaction: Callable[[Job], Awaitable[Any]]) -> tuple[int, int]:
        """:meth:`prune` with an async ``transaction``."""
        counts = [0, 0]
        for index, job in enumerate(self.jobs()):
            while not self.stopped():
                pruned = int(await transaction(job))
                counts[index] += pruned
                if pruned < PRUNE_BATCH:
                    break
        return counts[0], counts[1]
