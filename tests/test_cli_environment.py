"""Environment variables: OUTBOXER_DB/OUTBOXER_BROKER are shared; every other setting is
scoped to its command; filters and confirmations read no variable at all."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, insert

import outboxer
from outboxer.cli import main
from outboxer.cli.inbox import main as inbox_main


@pytest.fixture
def url_with_dead_letters(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'env.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    now = datetime.now(timezone.utc)
    with engine.begin() as connection:
        for consumer in ("billing", "audit"):
            connection.execute(
                insert(outboxer.dead_letter).values(
                    origin="handler",
                    consumer=consumer,
                    handler="charge",
                    payload=b"{}",
                    error_type="ValueError",
                    error_message="declined",
                    attempts=1,
                    first_failed_at=now,
                    last_failed_at=now,
                )
            )
    engine.dispose()
    return url


def test_a_consumer_variable_set_for_outboxer_inbox_does_not_filter_dead_letters(
    url_with_dead_letters: str,
) -> None:
    env = {
        "OUTBOXER_DB": url_with_dead_letters,
        "OUTBOXER_CONSUMER": "someone-else",
        "OUTBOXER_DEAD_LETTER_LIST_CONSUMER": "someone-else",
        "OUTBOXER_HANDLER": "nothing",
        "OUTBOXER_ORIGIN": "relay",
    }
    listed = CliRunner().invoke(main, ["dead-letter", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert sorted(json.loads(line)["consumer"] for line in listed.output.splitlines()) == [
        "audit",
        "billing",
    ]


def test_no_variable_answers_the_purge_confirmation(url_with_dead_letters: str) -> None:
    env = {
        "OUTBOXER_DB": url_with_dead_letters,
        "OUTBOXER_YES": "1",
        "OUTBOXER_DEAD_LETTER_PURGE_YES": "1",
    }
    refused = CliRunner().invoke(main, ["dead-letter", "purge"], env=env, input="n\n")
    assert refused.exit_code == 1  # click's Abort
    listed = CliRunner().invoke(main, ["dead-letter", "list", "--json"], env=env)
    assert len(listed.output.splitlines()) == 2


def test_batch_size_is_scoped_per_command(tmp_path: Path) -> None:
    """OUTBOXER_BATCH_SIZE meant rows per claim to the relay and rows per transaction to
    inbox prune, with different ranges; each command now has its own variable."""
    url = f"sqlite:///{tmp_path / 'prune.sqlite'}"
    outboxer.create_all(create_engine(url))
    runner = CliRunner()
    # 50,000 is valid for prune but beyond the relay's range: an unscoped variable would
    # break one of the two commands.
    prune = runner.invoke(
        main,
        ["inbox", "prune"],
        env={"OUTBOXER_DB": url, "OUTBOXER_INBOX_PRUNE_BATCH_SIZE": "50000"},
    )
    assert prune.exit_code == 0, prune.output
    relay = runner.invoke(
        main,
        ["relay", "--broker", "memory://env", "--once"],
        env={"OUTBOXER_DB": url, "OUTBOXER_BATCH_SIZE": "50000"},
    )
    assert relay.exit_code == 0, relay.output
    bad = runner.invoke(
        main,
        ["relay", "--broker", "memory://env", "--once"],
        env={"OUTBOXER_DB": url, "OUTBOXER_RELAY_BATCH_SIZE": "50000"},
    )
    assert bad.exit_code == 2
    assert "--batch-size" in bad.output and "50000" in bad.output


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


@pytest.mark.parametrize("path", [*commands(main), ("outboxer-inbox",)], ids=" ".join)
def test_every_command_takes_log_options_and_shows_only_scoped_variables(
    path: tuple[str, ...],
) -> None:
    runner = CliRunner()
    if path == ("outboxer-inbox",):
        shown = runner.invoke(inbox_main, ["--help"], terminal_width=200).output
        scope = "OUTBOXER_INBOX_"
    else:
        shown = runner.invoke(main, [*path, "--help"], terminal_width=200).output
        scope = "OUTBOXER_" + "_".join(path).upper().replace("-", "_") + "_"
    assert "--log-level" in shown and "--log-format" in shown
    assert scope + "LOG_LEVEL" in shown
    variables = {word.strip("[],;:.") for word in shown.split() if word.startswith("OUTBOXER_")}
    for variable in variables:
        assert variable in ("OUTBOXER_DB", "OUTBOXER_BROKER") or variable.startswith(scope), (
            variable
        )
    for never in ("--yes", "--consumer", "--handler", "--origin", "--since", "--json"):
        if never in shown:
            flag = never[2:].upper()
            assert f"{scope}{flag}" not in shown


def test_counts_in_cli_output_take_the_right_plural(url_with_dead_letters: str) -> None:
    env = {"OUTBOXER_DB": url_with_dead_letters}
    one = CliRunner().invoke(
        main, ["dead-letter", "purge", "--yes", "--consumer", "billing"], env=env
    )
    assert "deleted 1 dead letter\n" in one.output, one.output
    rest = CliRunner().invoke(main, ["dead-letter", "purge", "--yes"], env=env)
    assert "deleted 1 dead letter\n" in rest.output
    none = CliRunner().invoke(main, ["inbox", "prune", "--older-than", "0"], env=env)
    assert "deleted 0 inbox rows" in none.output
