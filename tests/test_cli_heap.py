"""The long-running commands settle their heap once started (outboxer.cli.heap): the
garbage of start-up collected, what survives frozen out of the collector's sight."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from outboxer.cli.heap import settle  # the real one (conftest makes the module's a no-op)

from .cli_apps import BIN, logapp_env, running, wait_for
from .test_cli_failures import as_process

DISCARD = "memory://?discard=true"
"""The in-process broker, which a relay process of its own takes only when told to."""


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # hand pytest its heap back


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settle_collects_the_garbage_of_start_up_then_freezes_the_rest(unfrozen: None) -> None:
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage  # only the collector can free a cycle
    kept = _Cycle()
    settle()
    assert gone() is None, "a cycle of start-up was frozen instead of collected"
    assert gc.get_freeze_count() > 1000
    assert not gc.is_tracked(kept) or kept not in gc.get_objects(), "kept was not frozen"


@pytest.mark.parametrize("command", ["relay", "inbox"])
def test_the_long_running_commands_settle_once_started(
    command: str, tmp_path: Path, sqlite_url: str
) -> None:
    env = logapp_env(tmp_path)
    if command == "relay":
        args = [str(BIN / "outboxer"), "relay", "--db", sqlite_url, "--broker", DISCARD]
    else:
        args = [str(BIN / "outboxer-inbox"), "logapp:consumer", "--broker", "memory://logapp"]
    log = tmp_path / "log"
    with log.open("w") as err, running([*args, "--log-level", "debug"], env, tmp_path, err) as p:
        wait_for(lambda: "objects frozen" in log.read_text() or p.poll() is not None, 60)
        assert p.poll() is None, log.read_text()
    assert "start-up heap:" in log.read_text()


def test_a_one_shot_run_does_not(sqlite_url: str) -> None:
    result = as_process(
        "relay", "--once", "--log-level", "debug", "--db", sqlite_url, "--broker", DISCARD
    )
    assert result.returncode == 0, result.stderr
    assert "start-up heap:" not in result.stderr
