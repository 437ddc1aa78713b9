"""The fuzz test's own generator, checked offline: every message it calls bad is bad.

``tests/test_consumer_fuzz.py`` counts one dead letter per bad message. A generated
"bad" message that the consumer can in fact handle is processed instead, and the run
reports a missing dead letter (and, when its key matches a good message's, a message
processed twice). This happened: ``body_wrong_shape`` sent ``{"order_id": "5"}``, which
the payload's type reads as order 5 (pydantic's lax mode turns numeric text into an
int). Here each defect that the intake sees (not the ones only the wire's decoders see)
goes through the consumer's intake, and it must reject every one.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.intake import Rejected

from .models import OrderPlaced
from .test_consumer_fuzz import AMQP_ONLY, DEFECTS, SQS_ONLY, Poison, bad_message, poison

NAME = "fuzzcheck"
# Decoded by the wire itself (pika's table decoder, AMQP properties, SQS attributes):
# tests/test_consumer_hostile.py covers those paths.
WIRE_LEVEL = {"deep_header_table", "timestamp_only_huge", "id_not_utf8", *SQS_ONLY}
INTAKE_DEFECTS = [d for d in DEFECTS + AMQP_ONLY if d not in WIRE_LEVEL]

consumer = outboxer.Consumer(
    sessionmaker(create_engine("sqlite://"), class_=outboxer.OutboxSession), name=NAME
)


@consumer.handler(OrderPlaced, destination="fuzz")
def reserve(event: OrderPlaced, session: Session) -> None:
    pass


@consumer.handler("fuzz.admin", destination="fuzz")
def admin(event: Any, session: Session) -> None:
    pass


@settings(max_examples=500, deadline=None, database=None)
@given(poison(INTAKE_DEFECTS))
@example(Poison("body_wrong_shape", {}, "5", 0, 50))  # numeric text is an order id
@example(Poison("body_wrong_shape", {}, " 7 ", 0, 50))
def test_every_generated_bad_message_is_rejected_by_the_intake(p: Poison) -> None:
    body, headers = bad_message(Poison(p.defect, {}, p.text, p.number, p.depth), "n0", NAME)
    text_headers = {name: str(value) for name, value in headers.items()}
    outcome = consumer.processor().intake(body, text_headers, "fuzz")
    assert isinstance(outcome, Rejected), (p.defect, body[:200], outcome)
