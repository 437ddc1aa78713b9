"""Handlers without a database transaction (``transactional=False``; Ecotone's
``WithoutDatabaseTransaction``), for handlers that send e-mail or call HTTP and must not
hold a transaction open meanwhile.

    @consumer.handler(OrderPlaced, transactional=False)
    def send_receipt(event, context) -> None:
        mailer.send(event.customer, idempotency_key=str(context.message_id))

One run: a short transaction looks for the handler's inbox row (there: a duplicate, not
run); the handler runs outside any transaction; then a second short transaction writes
the inbox row, together with the messages the handler published through ``session``
(and any writes it made there). The guarantee is weaker than a transactional handler's:
a crash (or a failed inbox write) after the handler returned and before that commit
repeats the call at the next delivery. Outside calls should therefore carry an
idempotency key: ``context.message_id`` is the same on every run of the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .callables import call_async, call_sync
from .guard import guarded
from .handlers import Context, HandlerSpec
from .instrumentation import HandlerOutcome
from .message import Envelope
from .plan import RunResult
from .publishing import handling
from .store import inbox as inbox_store

__all__ = ["run_untransacted_async", "run_untransacted_sync"]


def run_untransacted_sync(
    session_factory: Callable[[], Any],
    spec: HandlerSpec,
    event: Any,
    context: Context,
    envelope: Envelope,
    inbox_row: Mapping[str, Any],
) -> RunResult:
    """One run of a sync handler without a transaction. Errors propagate: the caller
    tells a handler failure from a database outage, as for transactional handlers."""
    key = {"handler": inbox_row["handler"], "dedup_key": inbox_row["dedup_key"]}
    with session_factory() as session:
        with session.begin():
            if inbox_store.inbox_has(session.connection(), **key):
                return RunResult(HandlerOutcome.DUPLICATE)
        who = f"handler {spec.id}"
        with handling(envelope), guarded(session, who):
            call_sync(spec.fn, who, event, **spec.arguments(event, session, context))
        # Its own short transaction: the inbox row and what the handler published.
        if not inbox_store.record_inbox(session.connection(), **inbox_row):
            session.rollback()  # another consumer ran it meanwhile, and recorded it
            return RunResult(HandlerOutcome.DUPLICATE)
        session.commit()
    return RunResult(HandlerOutcome.PROCESSED)


async def run_untransacted_async(
    session_factory: Callable[[], Any],
    spec: HandlerSpec,
    event: Any,
    context: Context,
    envelope: Envelope,
    inbox_row: Mapping[str, Any],
) -> RunResult:
    """:func:`run_untransacted_sync` for ``async def`` handlers."""
    key = {"handler": inbox_row["handler"], "dedup_key": inbox_row["dedup_key"]}
    async with session_factory() as session:
        async with session.begin():
            seen = await session.run_sync(lambda s: inbox_store.inbox_has(s.connection(), **key))
        if seen:
            return RunResult(HandlerOutcome.DUPLICATE)
        with handling(envelope), guarded(session.sync_session, f"handler {spec.id}"):
            await call_async(spec.fn, event, **spec.arguments(event, session, context))
        recorded = await session.run_sync(
            lambda s: inbox_store.record_inbox(s.connection(), **inbox_row)
        )
        if not recorded:
            await session.rollback()
            return RunResult(HandlerOutcome.DUPLICATE)
        await session.commit()
    return RunResult(HandlerOutcome.PROCESSED)
