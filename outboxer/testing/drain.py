"""Run the relay and consumers until nothing moves: synchronous delivery for tests.

``drain(engine, [consumer])`` sends what is due in the outbox, lets each consumer process
what reached its queue, and repeats while anything moved (a handler may publish more).
With ``fail_fast`` (the default) an exception raised by a handler is raised again in the
test once the round is over, instead of turning into a retry or a dead letter unnoticed:
dramatiq's ``join(fail_fast=True)`` is the model. A message the consumer cannot read at all
(a payload that does not match its type, an unknown type: a dead letter of origin
``consumer``) fails the test too, as :class:`MessageRejected`. The default transport is
a fresh in-memory broker; any transport works (a real RabbitMQ, for instance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from .. import instrumentation
from ..consumer import Consumer
from ..instrumentation import Instrumentation, SpanHandle, TransportDescription
from ..message import Envelope
from ..relay import Relay
from ..tables import dead_letter
from ..transports.base import Transport
from ..transports.memory import MemoryBroker, MemoryTransport

__all__ = ["DrainReport", "HandlerFailed", "MessageRejected", "drain", "drain_async"]

Consumers = Consumer | Sequence[Consumer]
"""One consumer, or several."""


class HandlerFailed(AssertionError):
    """A handler raised while draining; the handler's exception is its ``__cause__``."""


class MessageRejected(AssertionError):
    """A consumer could not read a message while draining (its payload does not match its
    type, its type has no handler, its envelope is malformed): the dead letter the
    consumer wrote, in words."""


@dataclass
class DrainReport:
    """What a drain did, in total."""

    rounds: int = 0
    sent: int = 0
    """Messages the relay sent."""
    messages: int = 0
    """Deliveries the consumers processed."""
    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    """(handler, exception) for every handler run that raised."""


def drain(
    engine: Engine,
    consumers: Consumers = (),
    transport: Transport | None = None,
    *,
    fail_fast: bool = True,
    max_rounds: int = 50,
    idle_timeout: float | None = None,
) -> DrainReport:
    """Relay once, run each consumer once, until a round moves nothing; returns the totals.

    Each consumer's queue is declared first, so the relay's sends reach it. Messages held
    back by a delay (delayed retries included) stay in the outbox: in tests, give
    consumers ``Retry(max_attempts=1)`` (a failure goes straight to the dead-letter
    table), or rely on ``fail_fast``, which also raises :class:`MessageRejected` for a
    message a consumer could not read. ``consumers`` may be one consumer or several.
    ``idle_timeout`` is how long a consumer
    waits for a message before its round ends: 0.01 s on the in-memory broker (delivery
    is immediate), 1 s on a network broker. Sync consumers only; see :func:`drain_async`.
    """
    consumers = _listed(consumers)
    run = _Drain(engine, transport, fail_fast, max_rounds, idle_timeout)
    run.declare(consumers)
    with _capturing_errors(run.report):
        for _ in run.rounds():
            sent = run.relay.run(once=True).sent
            processed = sum(
                c.run(run.transport, once=True, idle_timeout=run.wait).messages for c in consumers
            )
            run.check_rejected(consumers)
            if run.quiet_after(sent, processed):
                return run.report
    raise run.still_busy()


async def drain_async(
    engine: Engine,
    consumers: Consumers = (),
    transport: Transport | None = None,
    *,
    fail_fast: bool = True,
    max_rounds: int = 50,
    idle_timeout: float | None = None,
) -> DrainReport:
    """:func:`drain` for consumers with ``async def`` handlers, in the caller's event loop.

    ``engine`` is a sync engine on the same database (the relay is synchronous; it runs in
    a thread here): ``create_engine(url)`` beside your ``create_async_engine(url)``.
    """
    import asyncio

    consumers = _listed(consumers)
    run = await asyncio.to_thread(_Drain, engine, transport, fail_fast, max_rounds, idle_timeout)
    await asyncio.to_thread(run.declare, consumers)
    with _capturing_errors(run.report):
        for _ in run.rounds():
            sent = (await asyncio.to_thread(run.relay.run, True)).sent
            processed = 0
            for consumer in consumers:
                if consumer.is_async:
                    stats = await consumer.run_async(
                        run.transport, once=True, idle_timeout=run.wait
                    )
                else:
                    stats = await asyncio.to_thread(
                        consumer.run, run.transport, once=True, idle_timeout=run.wait
                    )
                processed += stats.messages
            await asyncio.to_thread(run.check_rejected, consumers)
            if run.quiet_after(sent, processed):
                return run.report
    raise run.still_busy()


def _listed(consumers: Consumers) -> Sequence[Consumer]:
    if isinstance(consumers, Consumer):
        return [consumers]
    listed = list(consumers)
    for consumer in listed:
        if not isinstance(consumer, Consumer):
            raise TypeError(
                f"drain() takes an outboxer.Consumer or a list of them, got {consumer!r}"
            )
    return listed


class _Drain:
    """What drain() and drain_async() share: the set-up, the rounds and their accounting."""

    def __init__(
        self,
        engine: Engine,
        transport: Transport | None,
        fail_fast: bool,
        max_rounds: int,
        idle_timeout: float | None,
    ) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(
                f"drain() and drain_async() take a sync Engine on your database (the relay is "
                f"synchronous), got {type(engine).__name__}: pass create_engine(url) with the "
                "URL of your create_async_engine(url) (its sync driver: postgresql+psycopg, "
                "sqlite, mysql+pymysql)"
            )
        self.transport = transport if transport is not None else MemoryTransport(MemoryBroker())
        if idle_timeout is None:
            idle_timeout = 0.01 if isinstance(self.transport, MemoryTransport) else 1.0
        self.wait = idle_timeout
        self.relay = Relay(engine, self.transport, listen=False)
        self.report = DrainReport()
        self.fail_fast = fail_fast
        self.max_rounds = max_rounds
        self.engine = engine
        # Dead letters written before the drain are the test's own business.
        self.seen_dead_letter = self._newest_dead_letter() if fail_fast else 0

    def _newest_dead_letter(self) -> int:
        with self.engine.connect() as connection:
            newest = connection.execute(
                select(dead_letter.c.id).order_by(dead_letter.c.id.desc()).limit(1)
            ).scalar()
        return int(newest or 0)

    def check_rejected(self, consumers: Sequence[Consumer]) -> None:
        """With fail_fast, raise :class:`MessageRejected` for the first dead letter one of
        ``consumers`` wrote during the drain (a handler's give-up is raised as
        HandlerFailed)."""
        if not self.fail_fast or not consumers:
            return
        names = [consumer.name for consumer in consumers]
        with self.engine.connect() as connection:
            row = connection.execute(
                select(
                    dead_letter.c.consumer,
                    dead_letter.c.message_type,
                    dead_letter.c.error_type,
                    dead_letter.c.error_message,
                )
                .where(
                    dead_letter.c.id > self.seen_dead_letter,
                    dead_letter.c.origin == "consumer",
                    dead_letter.c.consumer.in_(names),
                )
                .order_by(dead_letter.c.id)
                .limit(1)
            ).first()
        if row is not None:
            raise MessageRejected(
                f"consumer {row.consumer} could not read a message of type "
                f"{row.message_type!r} and dead-lettered it ({row.error_type}): "
                f"{row.error_message} (drain(..., fail_fast=False) leaves it in the "
                "dead-letter table)"
            )

    def declare(self, consumers: Sequence[Consumer]) -> None:
        """Declare each consumer's queue and bindings, so the relay's sends reach them."""
        for consumer in consumers:
            self.transport.receiver(consumer.subscription()).close()

    def rounds(self) -> Iterator[int]:
        for number in range(1, self.max_rounds + 1):
            self.report.rounds = number
            yield number

    def quiet_after(self, sent: int, processed: int) -> bool:
        """Count a round; raise a handler's error (fail_fast); True when nothing moved."""
        self.report.sent += sent
        self.report.messages += processed
        _raise_first(self.report, self.fail_fast)
        return not sent and not processed

    def still_busy(self) -> RuntimeError:
        return RuntimeError(
            f"still busy after {self.max_rounds} rounds: do handlers publish forever?"
        )


def _raise_first(report: DrainReport, fail_fast: bool) -> None:
    if fail_fast and report.errors:
        handler, error = report.errors[0]
        raise HandlerFailed(f"handler {handler} raised {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _capturing_errors(report: DrainReport) -> Iterator[None]:
    """Wrap the active instrumentation to see each handler's exception (the consumer hands
    it to the handler span's ``record_error``), and restore it afterwards."""
    inner = instrumentation.get()
    instrumentation.install(_ErrorCapture(inner, report))
    try:
        yield
    finally:
        instrumentation.install(inner)


class _ErrorCapture(Instrumentation):
    """Delegates everything to ``inner``; records handler errors in ``report``."""

    def __init__(self, inner: Instrumentation, report: DrainReport) -> None:
        self.inner = inner
        self.report = report
        self.enabled = inner.enabled

    def create(self, envelope: Envelope) -> dict[str, str]:
        return self.inner.create(envelope)

    @contextlib.contextmanager
    def send(
        self, transport: TransportDescription, destination: str, envelopes: Sequence[Envelope]
    ) -> Iterator[SpanHandle]:
        with self.inner.send(transport, destination, envelopes) as span:
            yield span

    @contextlib.contextmanager
    def process(
        self, transport: TransportDescription, envelope: Envelope, consumer: str
    ) -> Iterator[SpanHandle]:
        with self.inner.process(transport, envelope, consumer) as span:
            yield span

    @contextlib.contextmanager
    def handler(self, envelope: Envelope, handler: str, attempt: int) -> Iterator[SpanHandle]:
        with self.inner.handler(envelope, handler, attempt) as span:
            yield _RecordingSpan(span, handler, self.report)

    @contextlib.contextmanager
    def step(
        self, name: str, envelope: Envelope | None, attributes: Mapping[str, Any] | None = None
    ) -> Iterator[SpanHandle]:
        with self.inner.step(name, envelope, attributes) as span:
            yield span

    @contextlib.contextmanager
    def replay(
        self, trace_headers: Mapping[str, str], attributes: Mapping[str, Any]
    ) -> Iterator[SpanHandle]:
        with self.inner.replay(trace_headers, attributes) as span:
            yield span

    def relay_batch(self, *, sent: int, retried: int, dead_lettered: int, duration: float) -> None:
        self.inner.relay_batch(
            sent=sent, retried=retried, dead_lettered=dead_lettered, duration=duration
        )

    def handler_done(self, handler: str, outcome: str, duration: float) -> None:
        self.inner.handler_done(handler, outcome, duration)

    def observe_outbox(self, callback: Any) -> None:
        self.inner.observe_outbox(callback)


class _RecordingSpan(SpanHandle):
    def __init__(self, span: SpanHandle, handler: str, report: DrainReport) -> None:
        self.span = span
        self.handler = handler
        self.report = report

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def record_error(self, exc: BaseException) -> None:
        self.report.errors.append((self.handler, exc))
        self.span.record_error(exc)

    def trace_headers(self) -> dict[str, str]:
        return self.span.trace_headers()
