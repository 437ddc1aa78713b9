"""`outboxer relay` from the command line (in-process broker; real brokers elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.cli import main
from outboxer.testing import MemoryBroker

from .models import OrderPlaced


def test_relay_once_sends_what_is_due_and_exits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    with Session.begin() as session:
        for i in range(3):
            session.publish(OrderPlaced(order_id=i))
    engine.dispose()

    result = CliRunner().invoke(
        main,
        ["relay", "--broker", "memory://cli-once", "--once", "--batch-size", "2"],
        env={"OUTBOXER_DB": url},
    )
    assert result.exit_code == 0, result.output
    broker = MemoryBroker.named("cli-once")
    assert [json.loads(m.payload)["order_id"] for m in broker.published] == [0, 1, 2]


def test_relay_rejects_an_unknown_broker_scheme(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["relay", "--db", f"sqlite:///{tmp_path / 'x.sqlite'}", "--broker", "kafka://x", "--once"],
    )
    assert result.exit_code == 3  # invalid URL
    assert "unknown broker URL scheme 'kafka'" in result.output
    assert "amqp://" in result.output


def test_relay_settings_read_variables_scoped_to_the_relay() -> None:
    result = CliRunner().invoke(main, ["relay", "--help"], terminal_width=200)
    for variable in (
        "OUTBOXER_DB",
        "OUTBOXER_BROKER",
        "OUTBOXER_RELAY_BATCH_SIZE",
        "OUTBOXER_RELAY_MAX_ATTEMPTS",
        "OUTBOXER_RELAY_POLL_INTERVAL",
        "OUTBOXER_RELAY_ONCE",
        "OUTBOXER_RELAY_LOG_LEVEL",
        "OUTBOXER_RELAY_LOG_FORMAT",
    ):
        assert variable in result.output
    assert "OUTBOXER_BATCH_SIZE" not in result.output
