"""The orders service, tested with outboxer.testing: what an endpoint published, and the
consumer run synchronously (drain) or in the app's lifespan."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.testclient import TestClient
from orders_api.app import create_app
from orders_api.consumers import shipping
from orders_api.db import engine
from orders_api.events import OrderPlaced
from sqlalchemy.engine import Engine

from outboxer import Relay
from outboxer.testing import HandlerFailed, MemoryTransport, Published, drain_async


@pytest.fixture
async def client(sync_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The app in the test's event loop (no lifespan: the tests drive the consumer)."""
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
        yield client
    await engine.dispose()


async def test_placing_an_order_publishes_order_placed(
    client: httpx.AsyncClient, outboxer_published: Published
) -> None:
    response = await client.post("/orders", json={"customer": "ada", "amount_cents": 4200})
    assert response.status_code == 201
    order_id = response.json()["id"]
    assert outboxer_published.one(OrderPlaced) == OrderPlaced(
        order_id=order_id, customer="ada", amount_cents=4200
    )
    outboxer_published.assert_published(OrderPlaced, key=str(order_id), destination="api-orders")


async def test_a_refused_order_publishes_nothing(
    client: httpx.AsyncClient, outboxer_published: Published
) -> None:
    response = await client.post("/orders", json={"customer": "ada", "amount_cents": "lots"})
    assert response.status_code == 422
    assert outboxer_published.envelopes == []


async def test_a_placed_order_is_shipped_once_the_consumer_ran(
    client: httpx.AsyncClient, sync_engine: Engine, outboxer_transport: MemoryTransport
) -> None:
    order_id = (await client.post("/orders", json={"customer": "bo", "amount_cents": 100})).json()[
        "id"
    ]
    assert (await client.get(f"/orders/{order_id}")).json()["shipped"] is False
    report = await drain_async(sync_engine, [shipping], outboxer_transport)
    assert (report.sent, report.messages) == (1, 1)
    assert (await client.get(f"/orders/{order_id}")).json()["shipped"] is True


async def test_a_failing_handler_fails_the_test_with_its_error(
    client: httpx.AsyncClient, sync_engine: Engine
) -> None:
    await client.post("/orders", json={"customer": "cy", "amount_cents": 0})
    with pytest.raises(HandlerFailed, match="nothing to ship"):
        await drain_async(sync_engine, [shipping])


def test_the_lifespan_runs_the_consumer_until_shutdown(
    sync_engine: Engine, outboxer_transport: MemoryTransport
) -> None:
    relay = Relay(sync_engine, outboxer_transport, listen=False)
    with TestClient(create_app(outboxer_transport)) as client:  # starts the lifespan
        order_id = client.post("/orders", json={"customer": "di", "amount_cents": 7}).json()["id"]
        relay.run(once=True)  # `outboxer relay` in production
        deadline = time.monotonic() + 30
        while not client.get(f"/orders/{order_id}").json()["shipped"]:
            assert time.monotonic() < deadline, "the lifespan's consumer did not ship the order"
            time.sleep(0.05)
    # Leaving the block ran the shutdown: the consumer stopped and the engine was disposed.
    assert shipping.stats.processed >= 1
