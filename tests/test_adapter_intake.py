"""An inbound adapter's intake: nothing a delivery carries raises out of it (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

import outboxer
from outboxer import wire
from outboxer.adapters import build_adapter, message_id_of, take_in
from outboxer.handlers import HandlerSpec
from outboxer.intake import Prepared, Rejected


@outboxer.message("test.adapter_intake.payment")
@dataclass
class Payment:
    payment_id: str
    amount_cents: int


def record(event: Payment) -> None:
    pass


def adapter(message_id: outboxer.FromHeader | outboxer.FromBody | None) -> HandlerSpec:
    return build_adapter(
        "payments",
        outboxer.Retry(),
        False,
        record,
        Payment,
        queue="webhooks",
        exchange=None,
        routing_key="#",
        message_id=message_id,
        name=None,
        retry=None,
        dedup_key=None,
    )


SPECS = [
    adapter(None),
    adapter(outboxer.from_header("x-webhook-id")),
    adapter(outboxer.from_body("payment_id")),
]
text = st.text(max_size=40)
headers = st.dictionaries(
    st.sampled_from(
        ["x-webhook-id", "X-Webhook-Id", wire.BROKER_MESSAGE_ID, wire.TRACEPARENT, wire.OCCURRED_AT]
    )
    | st.sampled_from(sorted(wire.RESERVED))
    | text,
    text,
    max_size=6,
)
bodies = (
    st.binary(max_size=200)
    | st.builds(
        lambda p, a: f'{{"payment_id": {p}, "amount_cents": {a}}}'.encode(),
        st.sampled_from(['"p"', "1", "null", "[]", '""']),
        st.sampled_from(["1", '"x"', "-5", "1e400", "null"]),
    )
    | st.just(b"[" * 5000)
)


@given(body=bodies, headers=headers, which=st.integers(0, len(SPECS) - 1))
def test_whatever_a_delivery_carries_the_intake_answers(
    body: bytes, headers: dict[str, str], which: int
) -> None:
    spec = SPECS[which]
    result = take_in(body, headers, "webhooks", "payments", spec)
    assert isinstance(result, (Prepared, Rejected))
    if isinstance(result, Prepared):
        envelope = result.envelope
        assert envelope.handler is None and envelope.type == "test.adapter_intake.payment"
        assert not any(k.lower().startswith(("outboxer-", "x-outboxer-")) for k in envelope.headers)
        assert isinstance(result.events[spec.id], Payment)
    else:
        assert result.dead_letter.origin == "consumer" and result.reason


def test_a_message_id_that_is_no_uuid_becomes_a_stable_one() -> None:
    assert message_id_of("evt_1") == message_id_of("evt_1") != message_id_of("evt_2")
    uuid = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    assert str(message_id_of(uuid)) == uuid
