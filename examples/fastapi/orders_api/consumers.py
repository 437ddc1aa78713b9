"""The service's consumer: async handlers, run in the web process by the app's lifespan."""

from __future__ import annotations

import os

import outboxer

from .db import Session, Shipment
from .events import OrderPlaced

shipping = outboxer.Consumer(
    Session,
    name=os.environ.get("ORDERS_CONSUMER", "api-shipping"),
    retry=outboxer.Retry(max_attempts=5, initial_delay=1.0),
)


@shipping.handler(OrderPlaced)
async def prepare_shipment(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
    """At most once per order: the shipment commits with this handler's inbox row."""
    if event.amount_cents <= 0:
        raise ValueError(f"order {event.order_id} has nothing to ship")
    session.add(Shipment(order_id=event.order_id))
