"""`outboxer demo` runs the whole journey and says what happened."""

from __future__ import annotations

import logging

from click.testing import CliRunner

from outboxer.cli import main


def test_the_demo_runs_the_whole_journey() -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    for expected in (
        "stored together",
        "its message is gone with it",
        "a bad payload fails in the caller",
        "relay: 2 sent",
        "order 1 charged on the retry",
        "'charge_card': 'duplicate'",
        "PermissionError: card of cy is blocked",
        "charges: [1, 3]; reserve_stock and send_receipt did not run again",
        "outbox pending: 0, dead letters: 0",
        "replay billing:charge_card",
    ):
        assert expected in result.output, expected


def test_the_demo_leaves_the_outboxer_loggers_level_as_it_found_it() -> None:
    """Before (2026-11-30): the demo set the ``outboxer`` logger to WARNING + 5 and left it
    so: run in-process (``main(["demo"])``, as this file does), it silenced every later
    WARNING of outboxer in that process (a test of the relay's warnings, further on in the
    suite, saw none)."""
    logger = logging.getLogger("outboxer")
    before = logger.level
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert logger.level == before
