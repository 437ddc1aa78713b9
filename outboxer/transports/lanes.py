"""Sending in lanes: how the AWS transports (SQS, SNS) spread one batch over parallel calls.

One ``send`` splits its messages into *lanes* that run in parallel on a thread pool; each
lane makes its batch calls (``SendMessageBatch``, ``PublishBatch``) one after the other.
All messages of one group (the same target and key) are in one lane, in batch order, so
they reach the broker in that order; keys and unkeyed messages are packed so that calls
carry ten entries whenever possible. A call carries at most ten entries and ``max_bytes``,
all for one target (a queue URL, a topic ARN). When a keyed message is not sent (retry or
outage), later messages with its key in the same lane are held back
(:func:`~outboxer.transports.base.held_back`), so no later message overtakes it.

:func:`send_batch` is a transport's whole ``send``: it resolves each destination once (a
queue URL, a topic ARN; after one destination found the service unavailable, the rest are
not tried), has the transport prepare the :class:`Item` of each message, and sends them
in lanes. The transport makes one batch call for a list of items (``call``, entry ids
being their positions); this module decides what goes together and in which order, and
reads the answers the same way for both services: a failed entry with ``SenderFault`` is
REJECTED (unless its code is throttling or the service's own error), any other failed
entry RETRY; a whole call that raises gets ``call_failed``'s
result for each of its messages, except that a call refused as invalid (REJECTED, but not
``unroutable``) is made again one entry per call, so only the bad message is REJECTED
(a keyed message that fails there holds back its key's later ones, as between calls).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..message import Envelope
from .base import Outcome, SendResult, held_back

__all__ = [
    "MAX_ENTRIES",
    "UNROUTABLE",
    "Item",
    "chunks",
    "plan_lanes",
    "send_batch",
    "send_in_lanes",
]

MAX_ENTRIES = 10
"""Entries per batch call: SQS's SendMessageBatch and SNS's PublishBatch take ten."""

E = TypeVar("E")

UNROUTABLE = "unroutable"
"""``SendResult.error_type`` of a message for a queue or topic that cannot take it."""

Results = list[SendResult | None]
Call = Callable[[list["Item[E]"]], Mapping[str, Any]]
"""Makes one batch call for some items (entry ids: their positions) and returns the answer
(``Successful``: ``Id``, ``MessageId``; ``Failed``: ``Id``, ``Code``, ``Message``,
``SenderFault``)."""
CallFailed = Callable[[BaseException, str], SendResult]
"""The result of every message of a call to a target that raised this exception."""


@dataclass
class Item(Generic[E]):
    """One message on its way: its place in the batch and its prepared entry."""

    index: int
    target: str
    """Where the call goes (a queue URL, a topic ARN): a call has one target."""
    group: object
    """Messages of one group stay in one lane (same target and key); unkeyed: the index."""
    key: str | None
    size: int
    entry: E


def send_batch(
    envelopes: Sequence[Envelope],
    *,
    service: str,
    resolve: Callable[[str], str | SendResult],
    prepare: Callable[[int, Envelope, str], Item[E] | SendResult],
    concurrency: int,
    max_bytes: int,
    call: Call[E],
    call_failed: CallFailed,
    executor: Callable[[], ThreadPoolExecutor],
) -> list[SendResult]:
    """One result per envelope: ``resolve`` gives a destination's target (or the result of
    every message for it), ``prepare`` a message's item for that target (or its result);
    the items go out in lanes (:func:`send_in_lanes`)."""
    results: Results = [None] * len(envelopes)
    targets: dict[str, str | SendResult] = {}
    outage: SendResult | None = None
    items: list[Item[E]] = []
    for index, envelope in enumerate(envelopes):
        name = envelope.destination
        target = targets.get(name)
        if target is None:
            # Don't wait for a dead endpoint once per destination.
            target = outage if outage is not None else resolve(name)
            targets[name] = target
            if isinstance(target, SendResult) and target.outcome is Outcome.UNAVAILABLE:
                outage = target
        prepared = target if isinstance(target, SendResult) else prepare(index, envelope, target)
        if isinstance(prepared, SendResult):
            results[index] = prepared
        else:
            items.append(prepared)
    send_in_lanes(
        items,
        results,
        concurrency=concurrency,
        max_bytes=max_bytes,
        call=call,
        call_failed=call_failed,
        executor=executor,
    )
    return [
        r if r is not None else SendResult.retry("no_result", f"{service} did not report on it")
        for r in results
    ]


def send_in_lanes(
    items: list[Item[E]],
    results: Results,
    *,
    concurrency: int,
    max_bytes: int,
    call: Call[E],
    call_failed: CallFailed,
    executor: Callable[[], ThreadPoolExecutor],
) -> None:
    """Send ``items`` on up to ``concurrency`` lanes; ``executor`` gives the thread pool
    (asked for only when more than one lane is needed)."""
    if not items:
        return
    total = sum(item.size for item in items)
    calls = max(-(-len(items) // MAX_ENTRIES), -(-total // max_bytes))
    lanes = plan_lanes(items, min(concurrency, calls))
    send = _Sender(results, max_bytes, call, call_failed)
    if len(lanes) == 1:
        send.lane(lanes[0])
        return
    pool = executor()
    futures = [pool.submit(send.lane, lane) for lane in lanes[1:]]
    send.lane(lanes[0])
    for future in futures:
        future.result()


@dataclass
class _Sender(Generic[E]):
    """Sends lanes of one batch, writing into its results."""

    results: Results
    max_bytes: int
    call: Call[E]
    call_failed: CallFailed

    def lane(self, lane: list[Item[E]]) -> None:
        """Send one lane's calls in order; hold back messages whose key failed earlier."""
        held: dict[object, SendResult] = {}
        for chunk in chunks(lane, self.max_bytes):
            sent = chunk
            if held:
                sent = []
                for item in chunk:
                    cause = held.get(item.group)
                    if cause is None:
                        sent.append(item)
                    else:
                        self.results[item.index] = held_back(item.key, cause)
                if not sent:
                    continue
            self.batch(sent)
            for item in sent:
                result = self.results[item.index]
                # A rejected message will never be sent: later ones need not wait for it.
                if (
                    item.key is not None
                    and result is not None
                    and result.outcome in (Outcome.RETRY, Outcome.UNAVAILABLE)
                ):
                    held.setdefault(item.group, result)

    def batch(self, chunk: list[Item[E]]) -> None:
        """One batch call; see the module docstring for how its answer is read."""
        results = self.results
        try:
            response = self.call(chunk)
        except Exception as exc:
            result = self.call_failed(exc, chunk[0].target)
            if (
                result.outcome is Outcome.REJECTED
                and result.error_type != UNROUTABLE
                and len(chunk) > 1
            ):
                # The call was refused as invalid: find the message it was about. A key
                # whose message fails here holds its later ones back, as between calls.
                stopped: dict[object, SendResult] = {}
                for item in chunk:
                    cause = stopped.get(item.group)
                    if cause is not None:
                        results[item.index] = held_back(item.key, cause)
                        continue
                    self.batch([item])
                    alone = results[item.index]
                    if (
                        item.key is not None
                        and alone is not None
                        and alone.outcome in (Outcome.RETRY, Outcome.UNAVAILABLE)
                    ):
                        stopped[item.group] = alone
                return
            for item in chunk:
                results[item.index] = result
            return
        for ok in response.get("Successful", ()):
            results[chunk[int(ok["Id"])].index] = SendResult.sent(ok.get("MessageId"))
        for failed in response.get("Failed", ()):
            code = failed.get("Code") or "error"
            message = failed.get("Message") or code
            index = chunk[int(failed["Id"])].index
            if failed.get("SenderFault") and not _passing(code):
                results[index] = SendResult.rejected(code, message)
            else:
                results[index] = SendResult.retry(code, message)


_PASSING = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable"})


def _passing(code: str) -> bool:
    """Whether a failed entry's ``code`` is trouble that passes (throttling by the service
    or by KMS, its own errors), which a later send gets through, whatever ``SenderFault``
    says: AWS may blame a throttled entry on the sender, who sent too fast."""
    return "Throttl" in code or code in _PASSING


def plan_lanes(items: list[Item[E]], lanes: int) -> list[list[Item[E]]]:
    """Spread ``items`` over at most ``lanes`` lanes, each group whole, filling calls of ten.

    Groups go largest first to the lane where they add the fewest calls (then the least
    loaded one), so single messages top up partly filled calls before opening new ones.
    """
    if lanes <= 1:
        return [items]
    groups: dict[object, list[Item[E]]] = {}
    for item in items:
        group = groups.get(item.group)
        if group is None:
            groups[item.group] = [item]
        else:
            group.append(item)
    plan: list[list[Item[E]]] = [[] for _ in range(lanes)]
    counts = [0] * lanes
    if len(groups) == len(items):
        # No two messages share a key: deal out whole calls of ten, round robin.
        for n, start in enumerate(range(0, len(items), MAX_ENTRIES)):
            plan[n % lanes].extend(items[start : start + MAX_ENTRIES])
        return [lane for lane in plan if lane]
    for group in sorted(groups.values(), key=len, reverse=True):
        size = len(group)
        best, best_score = 0, (1 << 30, 1 << 30)
        for lane, count in enumerate(counts):
            score = (-(-(count + size) // MAX_ENTRIES) - -(-count // MAX_ENTRIES), count)
            if score < best_score:
                best, best_score = lane, score
        plan[best].extend(group)
        counts[best] += size
    for lane_items in plan:
        lane_items.sort(key=_by_index)
    return [lane for lane in plan if lane]


def _by_index(item: Item[E]) -> int:
    return item.index


def chunks(items: list[Item[E]], max_bytes: int) -> list[list[Item[E]]]:
    """Consecutive calls for a lane: one target each, at most ten entries and ``max_bytes``."""
    by_target: dict[str, list[Item[E]]] = {}
    for item in items:
        by_target.setdefault(item.target, []).append(item)
    calls: list[list[Item[E]]] = []
    for target_items in by_target.values():
        chunk: list[Item[E]] = []
        size = 0
        for item in target_items:
            if chunk and (len(chunk) == MAX_ENTRIES or size + item.size > max_bytes):
                calls.append(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += item.size
        if chunk:
            calls.append(chunk)
    return calls
