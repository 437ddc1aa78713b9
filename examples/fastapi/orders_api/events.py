"""The messages the service publishes and handles."""

from __future__ import annotations

from pydantic import BaseModel

import outboxer


@outboxer.message("api.order_placed", destination="api-orders", key="order_id")
class OrderPlaced(BaseModel):
    order_id: int
    customer: str
    amount_cents: int
