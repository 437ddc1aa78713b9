"""examples/shop, run the way examples/README.md tells users to: on PostgreSQL with RabbitMQ,
and with SNS and SQS (moto)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from .broker_rabbitmq import RabbitMQAdmin, rabbitmq_address
from .services import RABBITMQ_URL, port_open, require

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_the_shop_example_places_relays_and_charges_each_order_once(db_url: str) -> None:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start it with: rabbitmq-server -detached")
    queue = f"shop-billing-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(EXAMPLES),
        "SHOP_DB": db_url,
        "SHOP_CONSUMER": queue,
        "OUTBOXER_DB": db_url,
        "OUTBOXER_BROKER": RABBITMQ_URL,
    }

    def run(*command: str) -> str:
        done = subprocess.run(
            command, check=False, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    try:
        placed = run(sys.executable, "-m", "shop.place_orders", "3")
        assert placed.count("waits in the outbox") == 3
        # The consumer declares its queue and bindings; then the relay has somewhere to send.
        run(str(BIN / "outboxer-inbox"), "shop.app:billing", "--once")
        relayed = run(str(BIN / "outboxer"), "relay", "--once")
        assert "3 sent" in relayed
        consumed = run(str(BIN / "outboxer-inbox"), "shop.app:billing", "--once")
        assert consumed.count("receipt for order") == 3
        again = run(str(BIN / "outboxer-inbox"), "shop.app:billing", "--once")
        assert "receipt for order" not in again, "the queue should be empty"
        engine = create_engine(db_url)
        with engine.connect() as conn:
            charges = conn.execute(
                text(
                    "SELECT o.amount_cents, c.amount_cents FROM shop_orders o"
                    " JOIN shop_charges c ON c.order_id = o.id"
                )
            ).all()
        engine.dispose()
        assert sorted(charges) == [(100, 100), (101, 101), (102, 102)]
    finally:
        admin = RabbitMQAdmin()
        try:
            admin.delete(queues=[queue])
        finally:
            admin.close()
        engine = create_engine(db_url)
        with engine.begin() as conn:
            for table in ("shop_charges", "shop_audit", "shop_orders"):
                conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_the_shop_on_sns_gives_billing_and_audit_every_order_and_shows_the_topology(
    db_url: str, moto_endpoint: str
) -> None:
    """examples/README.md's "Fan-out on AWS": both consumers, one relay, sns://."""
    suffix = uuid.uuid4().hex[:8]
    billing, audit = f"shop-billing-{suffix}", f"shop-audit-{suffix}"
    env = {
        **os.environ,
        "PYTHONPATH": str(EXAMPLES),
        "SHOP_DB": db_url,
        "SHOP_CONSUMER": billing,
        "SHOP_AUDIT": audit,
        "OUTBOXER_DB": db_url,
        "OUTBOXER_BROKER": f"sns://?region=us-east-1&endpoint_url={moto_endpoint}",
    }

    def run(*command: str) -> str:
        done = subprocess.run(
            command, check=False, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    inbox = str(BIN / "outboxer-inbox")
    try:
        assert run(sys.executable, "-m", "shop.place_orders", "3").count("waits in") == 3
        # Each consumer creates its queue and subscribes it to the shop-orders topic.
        run(inbox, "shop.app:billing", "--once")
        run(inbox, "shop.app:audit", "--once")
        topology = run(sys.executable, "-m", "shop.topology")
        assert "SNS topic shop-orders\n" in topology
        for queue in (billing, audit):
            assert f"  -> SQS queue {queue} (shop.order_placed; raw delivery true)" in topology
            assert f"SNS topic {queue}\n  -> SQS queue {queue} (every type;" in topology
            assert f"SQS queue {queue} accepts messages from SNS topics " in topology
        assert "3 sent" in run(str(BIN / "outboxer"), "relay", "--once")
        assert run(inbox, "shop.app:billing", "--once").count("receipt for order") == 3
        run(inbox, "shop.app:audit", "--once")
        engine = create_engine(db_url)
        with engine.connect() as conn:
            charged = conn.execute(text("SELECT count(*) FROM shop_charges")).scalar()
            audited = conn.execute(text("SELECT count(*) FROM shop_audit")).scalar()
        engine.dispose()
        assert (charged, audited) == (3, 3)
    finally:
        engine = create_engine(db_url)
        with engine.begin() as conn:
            for table in ("shop_charges", "shop_audit", "shop_orders"):
                conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


def test_the_fastapi_examples_own_tests_pass() -> None:
    """examples/fastapi's tests, run the way its README says: ``cd examples/fastapi && pytest``."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=EXAMPLES / "fastapi",
        env={k: v for k, v in os.environ.items() if k != "ORDERS_DB"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout, done.stdout
