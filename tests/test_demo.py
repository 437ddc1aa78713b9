"""`outboxer demo` runs the whole journey and says what happened."""

from __future__ import annotations

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
