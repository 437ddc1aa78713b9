"""The web app: ``uvicorn orders_api.app:app`` (with ``OUTBOXER_BROKER`` set).

``POST /orders`` stores the order and its ``OrderPlaced`` in one transaction
(``AsyncOutboxSession``); the lifespan runs the ``shipping`` consumer in the app's event
loop with ``run_async`` and stops it on shutdown, letting the messages in progress finish.
The relay is its own process (``outboxer relay``), as in any deployment.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import outboxer
from outboxer.transports import Transport

from .consumers import shipping
from .db import Order, Session, Shipment, engine
from .events import OrderPlaced


class NewOrder(BaseModel):
    customer: str
    amount_cents: int


class OrderView(BaseModel):
    id: int
    customer: str
    amount_cents: int
    shipped: bool


def create_app(transport: Transport | None = None) -> FastAPI:
    """The app; ``transport`` defaults to ``OUTBOXER_BROKER`` (tests pass a memory one)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker = transport or outboxer.transport_from_url(os.environ["OUTBOXER_BROKER"])
        # Declare the queue and its bindings before the app serves requests, so the first
        # order's message has somewhere to go when the relay sends it.
        await asyncio.to_thread(lambda: broker.receiver(shipping.subscription()).close())
        consuming = asyncio.create_task(shipping.run_async(broker, concurrency=4))
        try:
            yield
        finally:
            shipping.stop()  # stop receiving; the messages in progress finish first
            await consuming
            if transport is None:
                broker.close()
            await engine.dispose()

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def place_order(new: NewOrder) -> OrderView:
        async with Session.begin() as session:
            order = Order(customer=new.customer, amount_cents=new.amount_cents)
            session.add(order)
            await session.flush()  # assigns order.id
            # No await: publish() does no I/O. The commit stores the order and the message.
            session.publish(
                OrderPlaced(
                    order_id=order.id, customer=order.customer, amount_cents=order.amount_cents
                )
            )
        return OrderView(
            id=order.id, customer=order.customer, amount_cents=order.amount_cents, shipped=False
        )

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> OrderView:
        async with Session() as session:
            order = await session.get(Order, order_id)
            if order is None:
                raise HTTPException(404, f"no order {order_id}")
            shipped = await session.get(Shipment, order_id) is not None
            return OrderView(
                id=order.id,
                customer=order.customer,
                amount_cents=order.amount_cents,
                shipped=shipped,
            )

    return app


app = create_app()
