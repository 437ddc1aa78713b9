"""Destination and consumer names are checked against the chosen broker's rules."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import outboxer
from outboxer.cli.inbox import main as inbox_main
from outboxer.publishing import build_message
from outboxer.transports.names import name_problem

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("broker", "name", "fine"),
    [
        ("sqs", "orders", True),
        ("sqs", "shop-orders_2", True),
        ("sqs", "orders.fifo", True),
        ("sqs", "shop.orders", False),
        ("sqs", "orders.fifo.fifo", False),
        ("sqs", "a" * 80, True),
        ("sqs", "a" * 81, False),
        ("sqs", "a" * 75 + ".fifo", True),
        ("sqs", "a" * 76 + ".fifo", False),
        ("sqs", "caf\u00e9", False),
        ("sqs", "", False),
        ("rabbitmq", "shop.orders", True),
        ("rabbitmq", "amq.orders", False),
        ("rabbitmq", "\u00e9" * 127, True),
        ("rabbitmq", "\u00e9" * 128, False),  # 256 bytes
        ("rabbitmq", " ", False),
        ("memory", "anything at all", True),
    ],
)
def test_broker_naming_rules(broker: str, name: str, fine: bool) -> None:
    assert (name_problem(broker, name) is None) is fine


def test_the_sqs_refusal_names_a_name_that_works() -> None:
    problem = name_problem("sqs", "shop.orders")
    assert problem is not None and "use 'shop-orders'" in problem
    suggested = re.search(r"use '([^']+)'", problem)
    assert suggested and name_problem("sqs", suggested.group(1)) is None


@pytest.fixture
def dotted_consumer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "dotted_app.py").write_text(
        textwrap.dedent(
            f"""
            from dataclasses import dataclass
            from sqlalchemy import create_engine
            from sqlalchemy.orm import sessionmaker
            import outboxer

            @outboxer.message("dotted.placed", destination="shop.orders")
            @dataclass
            class Placed:
                n: int

            engine = create_engine("sqlite:///{tmp_path / "d.sqlite"}")
            consumer = outboxer.Consumer(
                sessionmaker(engine, class_=outboxer.OutboxSession), name="billing"
            )

            @consumer.handler(Placed)
            def charge(event: Placed) -> None: ...
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "dotted_app:consumer"
    sys.modules.pop("dotted_app", None)


def test_outboxer_inbox_refuses_a_destination_sqs_would_refuse_before_connecting(
    dotted_consumer: str,
) -> None:
    result = CliRunner().invoke(
        inbox_main,
        [dotted_consumer, "--broker", "sqs://?region=eu-west-1&endpoint_url=http://127.0.0.1:9"],
    )
    assert result.exit_code == 3, result.output
    assert "the destination of dotted.placed 'shop.orders'" in result.output
    assert "use 'shop-orders'" in result.output


def test_sending_to_an_invalid_sqs_name_is_rejected_with_the_reason(moto_endpoint: str) -> None:
    transport = outboxer.transport_from_url(f"sqs://?region=us-east-1&endpoint_url={moto_endpoint}")
    try:
        message = build_message({"n": 1}, type="names.ping", destination="shop.orders")
        [result] = transport.send([message.envelope])
    finally:
        transport.close()
    assert result.error_type == "invalid_name"
    assert "shop-orders" in (result.error or "")


def test_the_examples_use_names_every_broker_accepts() -> None:
    app = (ROOT / "examples" / "shop" / "app.py").read_text()
    destinations = re.findall(r"destination=\"([^\"]+)\"", app)
    consumers = re.findall(r"\"SHOP_CONSUMER\", \"([^\"]+)\"", app)
    assert destinations and consumers
    for name in destinations + consumers:
        for broker in ("sqs", "rabbitmq"):
            assert name_problem(broker, name) is None, (broker, name)


def test_the_compose_file_binds_its_ports_to_loopback_only() -> None:
    compose = (ROOT / "examples" / "docker-compose.yml").read_text()
    ports = re.findall(r"^\s*-\s*\"([^\"]+)\"", compose, re.MULTILINE)
    assert ports
    assert all(port.startswith("127.0.0.1:") for port in ports), ports
