"""A handler that never returns: logged, and reported by ``/live`` once every worker hangs.

Python cannot stop a thread, so a handler that hangs (an HTTP call without a timeout, a
lock wait) holds its worker for ever. Before, a consumer whose every worker hung processed
nothing while its loop kept turning: ``/live`` answered 200 for ever and nothing was
logged. Now a run longer than ``--slow-handler-warning`` logs a WARNING (again at doubling
intervals), and ``/live`` answers 503 once every worker has been in one run for longer
than ``--liveness-timeout``; a consumer with a free worker stays alive and keeps working.

Real ``outboxer-inbox`` processes on the in-process broker and SQLite; the handler blocks
while a file the test controls exists.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import signal
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.cli.inbox import main as inbox_main
from outboxer.errors import ConfigurationError
from outboxer.runner import RunOptions
from outboxer.watchdog import Watch

from .cli_apps import BIN, closed_port, running, wait_for
from .test_cli_health import answers, get

LIVENESS = 5.0
"""The smallest --liveness-timeout outboxer-inbox takes."""

APP = """
import asyncio, os, pathlib, time
from dataclasses import dataclass
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport

DIR = pathlib.Path(os.environ["HUNG_DIR"])
URL = f"sqlite:///{DIR / 'hung.sqlite'}"

@outboxer.message("hung.job", destination="hung")
@dataclass
class Job:
    n: int

def start(n):
    (DIR / f"started-{n}").touch()
    return DIR / f"hold-{n}"

if os.environ.get("HUNG_ASYNC"):
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    engine = create_async_engine(URL.replace("sqlite:", "sqlite+aiosqlite:"))
    consumer = outboxer.Consumer(
        async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession), name="hung"
    )

    @consumer.handler(Job, transactional=False)
    async def work(event: Job) -> None:
        hold = start(event.n)
        while hold.exists():  # an await that never ends, as long as the test wants
            await asyncio.sleep(0.05)
        (DIR / f"done-{event.n}").touch()
else:
    consumer = outboxer.Consumer(
        sessionmaker(create_engine(URL), class_=outboxer.OutboxSession), name="hung"
    )

    @consumer.handler(Job, transactional=False)
    def work(event: Job) -> None:
        hold = start(event.n)
        while hold.exists():  # a call that never returns, as long as the test wants
            time.sleep(0.05)
        (DIR / f"done-{event.n}").touch()

# The queue exists before the consumer's own relay sends the published jobs to it.
MemoryTransport(MemoryBroker.named("hung")).receiver(consumer.subscription())
"""


def publish(tmp_path: Path, *numbers: int, hold: bool = False) -> None:
    """Jobs ``numbers`` into the outbox (the consumer's own relay sends them); with
    ``hold`` their handler runs block until :func:`release`."""
    for n in numbers:
        if hold:
            (tmp_path / f"hold-{n}").touch()
    engine = create_engine(f"sqlite:///{tmp_path / 'hung.sqlite'}")
    outboxer.create_all(engine)
    with sessionmaker(engine, class_=outboxer.OutboxSession).begin() as session:
        for n in numbers:
            session.publish({"n": n}, type="hung.job", destination="hung")
    engine.dispose()


def release(tmp_path: Path, *numbers: int) -> None:
    for n in numbers:
        (tmp_path / f"hold-{n}").unlink()


def exists(path: Path) -> bool:
    return path.exists()


def inbox(tmp_path: Path, health: int) -> list[str]:
    (tmp_path / "hungapp.py").write_text(textwrap.dedent(APP))
    return [
        str(BIN / "outboxer-inbox"),
        "hungapp:consumer",
        "--broker",
        "memory://hung",
        "--concurrency",
        "2",
        "--batch-size",
        "1",
        "--liveness-timeout",
        f"{LIVENESS:g}",
        "--slow-handler-warning",
        "1",
        "--health-port",
        f"127.0.0.1:{health}",
    ]


def environment(tmp_path: Path, *, is_async: bool = False) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "HUNG_DIR": str(tmp_path),
    }
    if is_async:
        env["HUNG_ASYNC"] = "1"
    return env


WARNING = re.compile(
    r"consumer hung: handler hung:work has been running for ([\d.]+) s on message (\S+);"
)


def warnings(log: Path) -> dict[str, list[float]]:
    """The slow-run warnings in ``log``: the durations they name, by message id."""
    found: dict[str, list[float]] = {}
    for match in WARNING.finditer(log.read_text()):
        found.setdefault(match.group(2), []).append(float(match.group(1)))
    return found


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_live_fails_while_every_worker_hangs_and_recovers_when_they_return(
    tmp_path: Path, kind: str
) -> None:
    health = closed_port()
    is_async = kind == "async"
    publish(tmp_path, 1, 2, hold=True)
    log = tmp_path / "inbox.log"
    with (
        log.open("w") as stderr,
        running(
            inbox(tmp_path, health), environment(tmp_path, is_async=is_async), tmp_path, stderr
        ) as process,
    ):
        wait_for(lambda: exists(tmp_path / "started-1") and exists(tmp_path / "started-2"))
        hung_at = time.monotonic()
        wait_for(answers(health, "/live", 200), seconds=10)

        # Both workers hung for longer than --liveness-timeout: stuck, and why.
        wait_for(answers(health, "/live", 503), seconds=LIVENESS + 10)
        elapsed = time.monotonic() - hung_at
        assert elapsed > LIVENESS - 0.5  # not before the timeout
        status, body = get(health, "/live")
        assert status == 503
        answer = json.loads(body)
        assert answer["status"] == "stuck"
        assert answer["problem"].startswith(
            f"every worker (2) has been in one handler run for over {LIVENESS:g} s: "
        )
        assert "hung:work" in answer["problem"]

        # One warning per run once past 1 s, then at doubling intervals: not every second.
        seen = warnings(log)
        assert len(seen) == 2, log.read_text()
        for durations in seen.values():
            assert durations[0] >= 1.0
            assert all(b >= 1.8 * a for a, b in itertools.pairwise(durations)), durations
            assert len(durations) <= 4, durations  # 1, 2, 4 (8) s: not the 5+ of every second
        assert "a handler that never returns holds its worker (concurrency 2, 2 busy)" in (
            log.read_text()
        )

        # The handlers return: alive again, and the jobs are done.
        release(tmp_path, 1, 2)
        wait_for(lambda: exists(tmp_path / "done-1") and exists(tmp_path / "done-2"))
        wait_for(answers(health, "/live", 200), seconds=10)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_one_hung_worker_of_two_stays_alive_and_the_other_keeps_working(
    tmp_path: Path,
) -> None:
    health = closed_port()
    publish(tmp_path, 1, hold=True)
    log = tmp_path / "inbox.log"
    with (
        log.open("w") as stderr,
        running(inbox(tmp_path, health), environment(tmp_path), tmp_path, stderr) as process,
    ):
        wait_for(lambda: exists(tmp_path / "started-1"))
        hung_at = time.monotonic()
        publish(tmp_path, 2, 3)
        wait_for(lambda: exists(tmp_path / "done-2") and exists(tmp_path / "done-3"))

        # Well past --liveness-timeout with one worker hung: alive on every probe.
        deadline = hung_at + LIVENESS + 1.5
        while time.monotonic() < deadline:
            assert get(health, "/live")[0] == 200
            time.sleep(0.2)
        publish(tmp_path, 4)
        wait_for(lambda: exists(tmp_path / "done-4"))
        assert get(health, "/live")[0] == 200

        # The hung run is logged all the same.
        seen = warnings(log)
        assert max(map(len, seen.values())) >= 2, log.read_text()  # job 1's: 1 s, 2 s...
        assert "(concurrency 2, 1 busy)" in log.read_text()

        release(tmp_path, 1)
        wait_for(lambda: exists(tmp_path / "done-1"))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_a_slow_batch_names_its_handlers_and_counts_its_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = outboxer.Consumer(sessionmaker(class_=outboxer.OutboxSession), name="billing")

    @consumer.handler("billing.charge", destination="billing")
    def charge(event: object) -> None: ...

    class Held:
        destination = "billing"

        def __init__(self, n: int) -> None:
            self.headers = {"outboxer-id": f"id-{n}", "outboxer-type": "billing.charge"}

    batch = [Held(n) for n in range(5)]
    options = RunOptions(concurrency=4, slow_handler_warning=10.0)
    watch = Watch("billing", consumer.registry, options)
    now = time.monotonic()
    watch.started(batch, now - 11.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "outboxer.consumer"):
        watch.check(now)
        watch.check(now + 1.0)  # not again before twice the threshold
        watch.check(now + 10.0)  # 21 s: not before 22 s, twice the age of the warning
        watch.check(now + 12.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        "consumer billing: handler billing:charge has been running for 11 s on 5 messages "
        "(id-0, id-1, id-2 and 2 more); "
    )
    assert lines[0].endswith("(concurrency 4, 1 busy)")
    assert watch.stalled(now) is None  # three workers free


def test_a_run_waiting_out_a_database_outage_is_not_a_hung_worker() -> None:
    consumer = outboxer.Consumer(sessionmaker(class_=outboxer.OutboxSession), name="billing")

    @consumer.handler("billing.charge", destination="billing")
    def charge(event: object) -> None: ...

    class Held:
        destination = "billing"
        headers = {"outboxer-id": "id-1", "outboxer-type": "billing.charge"}

    class Outage:
        def wait(self, seconds: float) -> bool:
            seen.append(watch.stalled())
            return True

    seen: list[object] = []
    watch = Watch("billing", consumer.registry, RunOptions(concurrency=2))
    now = time.monotonic()
    first = watch.started([Held()], now - 100.0)  # type: ignore[list-item]
    second = watch.started([Held()], now - 90.0)  # type: ignore[list-item]
    stalled = watch.stalled(now)
    assert stalled is not None and stalled[:2] == (90.0, 2)
    assert stalled[2] == "billing:charge on message id-1; billing:charge on message id-1"
    assert first.wait_out(Outage(), 5.0)  # type: ignore[arg-type]
    assert seen == [None]  # not counted while it waits
    assert first.start is not None and first.start > now  # trying again: a new run
    watch.ended(second)
    assert watch.stalled() is None


@pytest.mark.parametrize("seconds", [0, -1.0, math.inf, math.nan, 1e13, "60", True])
def test_a_wrong_slow_handler_warning_is_refused(seconds: object) -> None:
    with pytest.raises(ConfigurationError, match="slow_handler_warning"):
        outboxer.Consumer(
            sessionmaker(class_=outboxer.OutboxSession),
            name="billing",
            slow_handler_warning=seconds,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("seconds", ["0", "0.5", "inf", "nan", "1e13", "soon"])
def test_a_wrong_slow_handler_warning_option_is_one_usage_line(seconds: str) -> None:
    result = CliRunner().invoke(
        inbox_main, ["app:consumer", "--broker", "memory://", "--slow-handler-warning", seconds]
    )
    assert result.exit_code == 2, result.output
    assert "--slow-handler-warning" in result.output
