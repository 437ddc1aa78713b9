"""One failing queue must not slow a receiver's other queues, nor be polled in a loop.

A receiver reading two queues, one of them deleted (a removed type's destination, say):
the deleted queue's poll fails at once, before the other queue's long poll answers, so
``receive`` raised, and the consumer paused as for a broker outage (0.5 s, then longer)
before reading the healthy queue again; and every ``receive`` polled the deleted queue
again, an API call each time.
"""

from __future__ import annotations

import json
import time
from typing import Any

from outboxer.errors import TransportError
from outboxer.transports import Delivery
from outboxer.transports.sqs import SQSTransport

from .test_transport_sqs import sqs, transport, unique

__all__ = ["sqs", "transport"]


def test_a_deleted_queue_neither_fails_the_receives_nor_is_polled_each_time(
    transport: SQSTransport, sqs: Any
) -> None:
    busy, gone = unique("busy"), unique("gone")
    receiver = transport.receive_from([busy, gone])
    busy_url, gone_url = transport.ensure_queue(busy), transport.ensure_queue(gone)
    sqs.delete_queue(QueueUrl=gone_url)
    polls = {"gone": 0}

    def count(params: dict[str, Any], **_: Any) -> None:
        if gone_url.encode() in params["body"]:
            polls["gone"] += 1

    events = transport.queue_client.meta.events
    events.register("before-call.sqs.ReceiveMessage", count)
    got: list[Delivery] = []
    raised: list[str] = []
    receives = 0
    try:
        deadline = time.monotonic() + 20
        for n in range(30):  # a steady trickle: the busy queue is never idle for long
            sqs.send_message(QueueUrl=busy_url, MessageBody=json.dumps({"n": n}))
            while len(got) <= n and time.monotonic() < deadline:
                receives += 1
                try:
                    batch = receiver.receive(10, 1.0)
                except TransportError as exc:
                    raised.append(str(exc))
                    continue
                for delivery in batch:
                    delivery.ack()
                got.extend(batch)
    finally:
        events.unregister("before-call.sqs.ReceiveMessage", count)
        receiver.close()
    assert sorted(json.loads(d.body)["n"] for d in got) == list(range(30))
    assert raised == [], raised[:3]  # the healthy queue was read all along
    assert polls["gone"] <= 5, (polls, receives)  # backed off, not once per receive
