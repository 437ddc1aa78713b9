"""The consumer against a model: a hypothesis state machine, on each database.

Messages for two handlers of one type arrive on the in-process broker, in any order,
some of them again (the broker's at-least-once delivery). Each message's ``reserve``
handler behaves as the model drew it: it succeeds; fails with a retryable error a few
times, then succeeds; fails for good (a non-retryable error); writes a row that
conflicts with an earlier message's (the database refuses it, late, at flush); or
commits its session (refused). The consumer runs with a batch size the model draws
(1: no batching), and the relay sends the delayed retries. Invariants:

* after every step, no message's effect happened twice, for either handler; no message
  has more dead letters for a handler than it had deliveries (one for a message delivered
  once: a poison message the broker delivers twice is two failures); and no message has
  both an effect and a dead letter for one handler;
* once everything is delivered and retried (``drain``), every message whose handler
  can succeed has its effect exactly once, and every other message is dead-lettered
  for that handler, with no effect; ``audit`` (which never fails) ran once for each.

The budget is small in ``make test``; ``HYPOTHESIS_PROFILE=chaos`` (``make chaos``) runs
more and longer examples.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer import wire
from outboxer.message import Envelope
from outboxer.testing import MemoryBroker, MemoryTransport

from .conftest import clean
from .consumer_line import envelope_of
from .models import Effect, Order, OrderPlaced

PROFILE = "chaos" if os.environ.get("HYPOTHESIS_PROFILE") == "chaos" else "ci"
BUDGET = {"ci": (8, 20), "chaos": (100, 40)}[PROFILE]
MAX_ATTEMPTS = 3
RETRY = outboxer.Retry(max_attempts=MAX_ATTEMPTS, initial_delay=0.01, max_delay=0.01, jitter=0.0)

BEHAVIOURS = ["ok", "fails once", "fails twice", "fails for good", "conflicts", "commits"]
SUCCEEDS = {"ok", "fails once", "fails twice"}
TRANSIENT = {"fails once": 1, "fails twice": 2}
CONFLICT_ID = 1  # the order id every "conflicts" message inserts (the first one wins)


@dataclass
class Sent:
    envelope: Envelope
    behaviour: str
    deliveries: int = 0


class ConsumerModel(RuleBasedStateMachine):
    engine: Engine
    Session: sessionmaker[outboxer.OutboxSession]

    @initialize(batch_size=st.sampled_from([1, 3, 20]))
    def start(self, batch_size: int) -> None:
        clean(self.engine)
        self.broker = MemoryBroker()
        self.transport = MemoryTransport(self.broker)
        self.relay = outboxer.Relay(self.engine, self.transport)
        self.consumer = outboxer.Consumer(
            self.Session, name="billing", retry=RETRY, batch_size=batch_size
        )
        self.sent: dict[int, Sent] = {}
        self.runs: Counter[int] = Counter()
        self.conflict_taken = False
        model = self

        @self.consumer.handler(OrderPlaced)
        def reserve(event: OrderPlaced, session: Session) -> None:
            sent = model.sent[event.order_id]
            model.runs[event.order_id] += 1
            behaviour = sent.behaviour
            if model.runs[event.order_id] <= TRANSIENT.get(behaviour, 0):
                raise ConnectionError(f"order {event.order_id}: a transient failure")
            if behaviour == "fails for good":
                raise KeyError(f"order {event.order_id}: a bug")
            if behaviour == "conflicts":
                session.add(Order(id=CONFLICT_ID, customer=str(event.order_id)))
            if behaviour == "commits":
                session.commit()
            session.add(Effect(handler="reserve", message_key=str(event.order_id)))

        @self.consumer.handler(OrderPlaced)
        def audit(event: OrderPlaced, session: Session) -> None:
            session.add(Effect(handler="audit", message_key=str(event.order_id)))

        self.transport.receiver(self.consumer.subscription())

    # The broker --------------------------------------------------------------------------

    def _deliver(self, sent: Sent) -> None:
        envelope = sent.envelope
        sent.deliveries += 1
        self.broker.inject("billing", envelope.payload, wire.encode_headers(envelope), "orders")

    @rule(behaviour=st.sampled_from(BEHAVIOURS))
    def publish(self, behaviour: str) -> None:
        order_id = 1000 + len(self.sent)
        sent = Sent(envelope_of(OrderPlaced(order_id=order_id)), behaviour)
        self.sent[order_id] = sent
        self._deliver(sent)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def deliver_again(self, data: st.DataObject) -> None:
        """The broker delivers a message once more (at-least-once)."""
        order_id = data.draw(st.sampled_from(sorted(self.sent)))
        self._deliver(self.sent[order_id])

    # The consumer and the relay ----------------------------------------------------------

    @rule()
    def consume(self) -> None:
        self.consumer.run(self.transport, once=True, idle_timeout=0.01)

    @rule()
    def relay_retries(self) -> None:
        """The relay sends the retries that are due (they are due within 10 ms)."""
        self.relay.run(once=True)

    # What the database holds -------------------------------------------------------------

    def _effects(self) -> Counter[tuple[str, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(Effect.handler, Effect.message_key))
            return Counter((handler, int(key)) for handler, key in rows)

    def _dead(self) -> list[outboxer.DeadLetter]:
        return outboxer.DeadLetters(self.Session).list(limit=10_000)

    @invariant()
    def no_effect_twice_and_one_dead_letter_each(self) -> None:
        if not hasattr(self, "sent"):
            return
        effects = self._effects()
        assert all(count == 1 for count in effects.values()), effects
        letters = Counter(
            (json.loads(letter.payload)["order_id"], letter.handler) for letter in self._dead()
        )
        for (order_id, handler), count in letters.items():
            assert count <= self.sent[order_id].deliveries, (order_id, handler, count)
            assert ("reserve", order_id) not in effects or handler != "reserve", order_id

    # The end: everything delivered and retried --------------------------------------------

    @rule()
    def drain(self) -> None:
        for _ in range(MAX_ATTEMPTS * 20):
            consumed = self.consumer.run(self.transport, once=True, idle_timeout=0.01)
            relayed = self.relay.run(once=True)
            with self.engine.connect() as conn:
                waiting = conn.execute(select(outboxer.outbox.c.id).limit(1)).first()
            if consumed.messages == 0 and relayed.sent == 0 and waiting is None:
                break
        else:
            raise AssertionError("the consumer and the relay did not come to rest")
        effects = self._effects()
        dead = {
            json.loads(letter.payload)["order_id"]
            for letter in self._dead()
            if letter.handler == "reserve"
        }
        for order_id, sent in self.sent.items():
            assert effects[("audit", order_id)] == 1, (order_id, sent)
            succeeds = sent.behaviour in SUCCEEDS or (
                sent.behaviour == "conflicts" and self._conflict_won(order_id)
            )
            if succeeds:
                assert effects[("reserve", order_id)] == 1, (order_id, sent, effects)
                assert order_id not in dead, (order_id, sent)
            else:
                assert effects[("reserve", order_id)] == 0, (order_id, sent)
                assert order_id in dead, (order_id, sent, dead)

    def _conflict_won(self, order_id: int) -> bool:
        """Whether ``order_id``'s insert of the conflicting order is the one that stuck."""
        with self.engine.connect() as conn:
            winner = conn.execute(
                select(Order.customer).where(Order.id == CONFLICT_ID)
            ).scalar_one_or_none()
        return winner == str(order_id)


@pytest.mark.long_profile
@pytest.mark.timeout(3600 if PROFILE == "chaos" else 600)
@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_the_consumer_keeps_each_effect_once_against_a_model(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession]
) -> None:
    examples, steps = BUDGET
    ConsumerModel.engine = engine
    ConsumerModel.Session = Session
    run_state_machine_as_test(
        ConsumerModel,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
