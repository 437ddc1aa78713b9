"""The batches between claim and settle, and the ordering rule that governs them.

**The rule**: a row of key *k* goes on the wire only if every earlier pending row of *k*
has been confirmed by the broker, or is on the wire ahead of it in this pipeline such
that a failure of the earlier row stops the later one too. Then the *first* delivery of
each message of a key happens in commit order, whatever fails; duplicates are allowed
(a retry may deliver again what a broker had stored without confirming it), reordering
is not.

How the pipeline keeps it:

* Batches go on the wire strictly one after another, each chained behind the previous
  send (``Transport.send_async(after=...)``): a transport that keeps several sends on one
  ordered channel fails a chained send whose predecessor failed at the connection level
  instead of carrying it over to a new connection (RabbitMQ); a transport that sends
  synchronously has finished each send before the next starts (SQS, memory).
* A batch whose results are already in is *landed* before the next batch goes out. When
  a landed batch has rows that will be sent again (a retry, a hand-back), their keys are
  **held**: every batch claimed before that outcome reached the database drops its rows
  of those keys (they are handed back) before it is sent. Claims made afterwards see the
  failed rows as pending and take nothing behind them.
* Inside one send, the transport holds back a key's later messages once one of its
  messages failed (SQS, memory), or publishes them in order on one channel (RabbitMQ).

What remains (docs/guarantees.md): a broker that refuses one message (a RabbitMQ nack)
after accepting a later message of the same key on the same channel puts the later one
first; outboxer cannot take back what the broker accepted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from contextlib import ExitStack
from dataclasses import dataclass, field

from .. import instrumentation
from ..instrumentation import SpanHandle
from ..store.relay import Claimed
from ..transports.base import Outcome, SendResult, Transport, held_back
from .database import STOP_GRACE

__all__ = ["Batch", "Landed", "Pipeline"]

log = logging.getLogger("outboxer.relay")

# A stopping relay waits STOP_GRACE seconds in all (the database thread's grace) for the
# broker's answers about the batches on the wire (a broker blocked by a resource alarm may
# hold them for hours); then they are handed back as unavailable: maybe stored, maybe not.
_SLICE = 0.1


@dataclass
class Batch:
    """Rows claimed under one lease token."""

    rows: list[Claimed]
    token: str
    claim_seconds: float = 0.0
    claim_started: float = 0.0
    """``time.perf_counter()`` when the claim began."""
    claim_seq: int = 0
    """When the claim ran among the relay's database tasks (see :class:`Pipeline`)."""


@dataclass
class Landed:
    """A batch back from the broker, with one result per row."""

    batch: Batch
    results: list[SendResult]
    send_seconds: float


@dataclass
class _Group:
    destination: str
    indexes: list[int]
    """Rows of the batch sent in this group (their place in ``batch.rows``)."""
    future: Future[list[SendResult]]
    span: SpanHandle
    held: dict[int, SendResult] = field(default_factory=dict)
    """Rows not sent: an earlier group already failed on their key."""
    results: list[SendResult] | None = None
    """The send's results, once read."""


@dataclass
class _OnWire:
    batch: Batch
    started: float
    groups: list[_Group] = field(default_factory=list)
    spans: ExitStack = field(default_factory=ExitStack)

    def done(self) -> bool:
        return all(g.future.done() for g in self.groups)


@dataclass
class _Hold:
    keys: set[str]
    until_seq: int
    """Batches claimed by database tasks before this one drop their rows of ``keys``."""


class Pipeline:
    """Batches on the wire, oldest first, and the keys held back by failed rows."""

    def __init__(
        self,
        transport: Transport,
        stop: threading.Event | None = None,
        waiting: Callable[[float], None] | None = None,
    ) -> None:
        self.transport = transport
        self._stop = stop
        self._waiting = waiting
        """Called every slice of a wait for the broker, with the seconds waited so far."""
        self._stopped_at: float | None = None
        self._wire: deque[_OnWire] = deque()
        self._landing: _OnWire | None = None
        """The batch whose results :meth:`land` waits for (off ``_wire`` already)."""
        self._last: Future[list[SendResult]] | None = None
        self._holds: list[_Hold] = []

    def __len__(self) -> int:
        return len(self._wire)

    def tokens(self) -> list[str]:
        """Lease tokens of the batches on the wire (their rows do not hold back their keys
        for this relay's next claim)."""
        landing = [] if self._landing is None else [self._landing.batch.token]
        return landing + [w.batch.token for w in self._wire]

    def oldest_done(self) -> bool:
        return bool(self._wire) and self._wire[0].done()

    # The ordering rule ---------------------------------------------------------------------

    def hold(self, keys: set[str], until_seq: int) -> None:
        """Keys with a row to be sent again; the outcome reaches the database with the
        database task ``until_seq``."""
        if keys:
            self._holds.append(_Hold(set(keys), until_seq))

    def held_rows(self, batch: Batch) -> list[int]:
        """The rows of ``batch`` that must not be sent: later rows of held keys."""
        self._holds = [h for h in self._holds if h.until_seq > batch.claim_seq]
        if not self._holds:
            return []
        keys = set().union(*(h.keys for h in self._holds))
        return [row.id for row in batch.rows if row.envelope.key in keys]

    # Sending and landing ---------------------------------------------------------------------

    def send(self, batch: Batch) -> None:
        """Put ``batch`` on the wire behind the batches already there."""
        sending = _OnWire(batch, time.perf_counter())
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(batch.rows):
            groups.setdefault(row.envelope.destination, []).append(index)
        tracer = instrumentation.get()
        failed: dict[str, SendResult] = {}  # keys that failed in a finished group
        for destination, all_indexes in groups.items():
            held = {
                i: held_back(key, failed[key])
                for i in all_indexes
                if (key := batch.rows[i].envelope.key) is not None and key in failed
            }
            for i in all_indexes:  # rows that cannot be sent as they are: never sent
                row = batch.rows[i]
                if row.malformed is not None and i not in held:
                    held[i] = SendResult.rejected(row.malformed_type, row.malformed)
            indexes = [i for i in all_indexes if i not in held]
            envelopes = [batch.rows[i].envelope for i in indexes]
            span = sending.spans.enter_context(
                tracer.send(self.transport.description, destination, envelopes)
            )
            try:
                pending = self.transport.send_async(envelopes, after=self._last)
            except Exception as exc:  # a transport bug or outage must not kill the relay
                pending = Future()
                pending.set_exception(exc)
            self._last = pending
            group = _Group(destination, indexes, pending, span, held)
            sending.groups.append(group)
            if pending.done():  # a synchronous transport: its failures hold their keys
                for i, result in zip(indexes, self._results(group), strict=True):
                    key = batch.rows[i].envelope.key
                    if key is not None and result.outcome is not Outcome.SENT:
                        failed.setdefault(key, result)
        self._wire.append(sending)

    def land(self) -> Landed:
        """Wait for the oldest batch's results (in batch order)."""
        sending = self._landing = self._wire.popleft()
        rows = sending.batch.rows
        results: list[SendResult | None] = [None] * len(rows)
        try:
            for group in sending.groups:
                for i, result in zip(group.indexes, self._results(group), strict=True):
                    results[i] = result
                for i, result in group.held.items():
                    results[i] = result
        finally:
            self._landing = None
            sending.spans.close()
        if not self._wire:
            self._last = None
        done = [r if r is not None else _NO_RESULT for r in results]
        return Landed(sending.batch, done, time.perf_counter() - sending.started)

    def _results(self, group: _Group) -> list[SendResult]:
        if group.results is None:
            group.results = self._read(group)
        return group.results

    def _read(self, group: _Group) -> list[SendResult]:
        if not self._answered(group.future):
            return [
                SendResult.unavailable(
                    "stopped",
                    f"the relay stopped and the broker had not answered within {STOP_GRACE:g} "
                    "s; the messages may or may not have been stored",
                )
            ] * len(group.indexes)
        try:
            results = group.future.result()
            if len(results) != len(group.indexes):
                raise RuntimeError(
                    f"{type(self.transport).__name__} returned {len(results)} results for "
                    f"{len(group.indexes)} messages"
                )
        except Exception as exc:
            log.error("sending to %r failed: %s: %s", group.destination, type(exc).__name__, exc)
            log.debug("the transport raised", exc_info=True)
            group.span.record_error(exc)
            failed = SendResult.unavailable(type(exc).__name__, f"{type(exc).__name__}: {exc}")
            return [failed] * len(group.indexes)
        failures = [r for r in results if r.outcome is not Outcome.SENT]
        if failures:
            group.span.set_attribute("error.type", failures[0].error_type or "error")
        return results

    def _answered(self, future: Future[list[SendResult]]) -> bool:
        """Wait for ``future``; once the relay is stopping, for what is left of the grace."""
        stop = self._stop
        began: float | None = None
        while not future.done():
            if stop is None:
                wait_for_futures([future])
                break
            if not stop.is_set():
                wait_for_futures([future], timeout=_SLICE)
                if self._waiting is not None and not future.done():
                    began = time.monotonic() - _SLICE if began is None else began
                    self._waiting(time.monotonic() - began)
                continue
            if self._stopped_at is None:
                self._stopped_at = time.monotonic()
            left = STOP_GRACE - (time.monotonic() - self._stopped_at)
            if left <= 0:
                return False
            wait_for_futures([future], timeout=min(left, _SLICE))
        return True


_NO_RESULT = SendResult.retry("no_result", "the transport did not report on this message")
