"""The consumer-side command line: outboxer-inbox, dead-letter, status, inbox prune."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.cli import main
from outboxer.cli.inbox import main as inbox_main
from outboxer.testing import MemoryBroker, MemoryTransport

APP = """
from dataclasses import dataclass
import os
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
import outboxer

@outboxer.message("cliapp.order_placed", destination="cli-orders")
@dataclass
class CliOrderPlaced:
    order_id: int

engine = create_engine(os.environ["CLIAPP_DB"])
Session = sessionmaker(engine, class_=outboxer.OutboxSession)
consumer = outboxer.Consumer(Session, name="cliapp", retry=outboxer.Retry(max_attempts=1))
handled = []

@consumer.handler(CliOrderPlaced)
def record(event: CliOrderPlaced) -> None:
    handled.append(event.order_id)

@consumer.handler(CliOrderPlaced)
def charge(event: CliOrderPlaced) -> None:
    if event.order_id % 2:
        raise ValueError(f"order {event.order_id}: card declined")
"""


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    """A small application module with a consumer, on a SQLite file; yields (db URL, module)."""
    url = f"sqlite:///{tmp_path / 'cliapp.sqlite'}"
    outboxer.create_all(create_engine(url))
    (tmp_path / "cliapp_module.py").write_text(textwrap.dedent(APP))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CLIAPP_DB", url)
    import cliapp_module  # type: ignore[import-not-found]

    yield url, cliapp_module
    sys.modules.pop("cliapp_module", None)


def run_app(url: str, module: object, broker_name: str, orders: range) -> None:
    Session = sessionmaker(create_engine(url), class_=outboxer.OutboxSession)
    with Session.begin() as session:
        for n in orders:
            session.publish(module.CliOrderPlaced(order_id=n))  # type: ignore[attr-defined]
    broker = MemoryBroker.named(broker_name)
    transport = MemoryTransport(broker)
    transport.receiver(module.consumer.subscription())  # type: ignore[attr-defined]
    outboxer.Relay(create_engine(url), transport).run(once=True)


def test_outboxer_inbox_runs_a_consumer_named_by_module_path(app: tuple[str, object]) -> None:
    url, module = app
    run_app(url, module, "cli-runner", range(1, 5))
    result = CliRunner().invoke(
        inbox_main, ["cliapp_module:consumer", "--broker", "memory://cli-runner", "--once"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(module.handled) == [1, 2, 3, 4]  # type: ignore[attr-defined]
    letters = outboxer.DeadLetters(sessionmaker(create_engine(url))).list()
    assert sorted(json.loads(d.payload)["order_id"] for d in letters) == [1, 3]


def test_outboxer_inbox_batch_size_overrides_the_consumers(
    app: tuple[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, module = app
    run_app(url, module, "cli-batch", range(1, 9))
    monkeypatch.setenv("OUTBOXER_INBOX_BATCH_SIZE", "3")
    result = CliRunner().invoke(
        inbox_main, ["cliapp_module:consumer", "--broker", "memory://cli-batch", "--once"]
    )
    assert result.exit_code == 0, result.output
    assert module.consumer.batch_size == 3  # type: ignore[attr-defined]
    assert sorted(module.handled) == list(range(1, 9))  # type: ignore[attr-defined]
    result = CliRunner().invoke(inbox_main, ["cliapp_module:consumer", "--batch-size", "0"])
    assert result.exit_code == 2
    assert "--batch-size" in result.output


def test_outboxer_inbox_explains_a_bad_consumer_path() -> None:
    result = CliRunner().invoke(inbox_main, ["no_such_module:consumer", "--broker", "memory://"])
    assert result.exit_code == 2
    assert "cannot import 'no_such_module'" in result.output
    result = CliRunner().invoke(inbox_main, ["justamodule", "--broker", "memory://"])
    assert "PACKAGE.MODULE:ATTRIBUTE" in result.output


def test_dead_letter_commands_list_show_replay_and_purge(app: tuple[str, object]) -> None:
    url, module = app
    run_app(url, module, "cli-dl", range(1, 8))
    CliRunner().invoke(
        inbox_main, ["cliapp_module:consumer", "--broker", "memory://cli-dl", "--once"]
    )
    runner = CliRunner(env={"OUTBOXER_DB": url, "COLUMNS": "250"})

    listed = runner.invoke(main, ["dead-letter", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["handler"] for r in rows] == ["charge"] * 4
    assert all(r["error_type"] == "ValueError" and "card declined" in r["error"] for r in rows)

    table = runner.invoke(main, ["dead-letter", "list", "--handler", "charge", "--since", "1h"])
    assert "ValueError" in table.output and "cliapp:charge" in table.output
    assert (
        "no dead letters match"
        in runner.invoke(main, ["dead-letter", "list", "--handler", "record"]).output
    )

    first = rows[-1]["id"]
    shown = runner.invoke(main, ["dead-letter", "show", str(first)])
    assert shown.exit_code == 0
    assert '"order_id":' in shown.output and "card declined" in shown.output
    assert "Traceback" in shown.output

    replayed = runner.invoke(main, ["dead-letter", "replay", str(first)])
    assert replayed.exit_code == 0, replayed.output
    assert "to handler cliapp:charge" in replayed.output
    engine = create_engine(url)
    with engine.connect() as conn:
        [row] = conn.execute(select(outboxer.outbox)).mappings().all()
    assert (row["target_handler"], row["destination"]) == ("cliapp:charge", "cliapp")

    assert runner.invoke(main, ["dead-letter", "show", str(first)]).exit_code == 1
    status = json.loads(runner.invoke(main, ["status", "--json"]).output)
    assert status["dead_letters"] == 3 and status["outbox_pending"] == 1
    assert status["inbox_rows"] == 7 + 3  # record ran 7 times, charge succeeded 3 times

    all_replayed = runner.invoke(main, ["dead-letter", "replay-all", "--yes", "--keep"])
    assert "replayed 3 of 3" in all_replayed.output
    assert "no dead letters match" in runner.invoke(main, ["dead-letter", "list"]).output
    history = runner.invoke(main, ["dead-letter", "list", "--all", "--json"]).output.splitlines()
    assert len(history) == 3

    purged = runner.invoke(main, ["dead-letter", "purge", "--yes"])
    assert "deleted 3 dead letters" in purged.output
    missing = runner.invoke(main, ["dead-letter", "delete", "12345"])
    assert missing.exit_code == 1 and "no dead letter has id 12345" in missing.output


def test_inbox_prune_deletes_old_rows_in_batches(app: tuple[str, object]) -> None:
    url, module = app
    run_app(url, module, "cli-prune", range(2, 12, 2))
    CliRunner().invoke(
        inbox_main, ["cliapp_module:consumer", "--broker", "memory://cli-prune", "--once"]
    )
    runner = CliRunner(env={"OUTBOXER_DB": url, "COLUMNS": "250"})
    kept = runner.invoke(main, ["inbox", "prune", "--older-than", "1h"])
    assert kept.exit_code == 0 and "deleted 0 inbox rows" in kept.output
    gone = runner.invoke(main, ["inbox", "prune", "--older-than", "0", "--batch-size", "3"])
    assert "deleted 10 inbox rows" in gone.output
    bad = runner.invoke(main, ["inbox", "prune", "--older-than", "a week"])
    assert bad.exit_code == 2 and "not a duration" in bad.output
