"""The long-running commands as processes: logging, broker outages at start, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .services import SERVERS, require
from .test_cli_failures import closed_port

BIN = Path(sys.executable).parent

APP = """
import logging.config, os, pathlib, time
from dataclasses import dataclass
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport

{logging}

@outboxer.message("logapp.ping", destination="logapp")
@dataclass
class Ping:
    n: int

engine = create_engine(os.environ["LOGAPP_DB"])
outboxer.create_all(engine)
Session = sessionmaker(engine, class_=outboxer.OutboxSession)
consumer = outboxer.Consumer(Session, name="logapp")

@consumer.handler(Ping)
def handle(event: Ping) -> None:
    pathlib.Path(os.environ["LOGAPP_MARK"]).write_text("started")
    time.sleep(float(os.environ.get("LOGAPP_SLEEP", "0")))

# Something to consume on the in-process broker of this process.
with Session.begin() as session:
    session.publish(Ping(1))
transport = MemoryTransport(MemoryBroker.named("logapp"))
transport.receiver(consumer.subscription())
outboxer.Relay(engine, transport).run(once=True)
"""

DICT_CONFIG = """
logging.config.dictConfig({
    "version": 1,
    "formatters": {"app": {"format": "APPFORMAT %(name)s %(message)s"}},
    "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "app"}},
    "root": {"level": "INFO", "handlers": ["err"]},
})
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Callable[..., dict[str, str]]:
    def write(logging_setup: str = "", sleep: float = 0.0) -> dict[str, str]:
        (tmp_path / "logapp.py").write_text(
            textwrap.dedent(APP).replace("{logging}", textwrap.dedent(logging_setup))
        )
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])
            ),
            "LOGAPP_DB": f"sqlite:///{tmp_path / 'logapp.sqlite'}",
            "LOGAPP_MARK": str(tmp_path / "mark"),
            "LOGAPP_SLEEP": str(sleep),
        }

    return write


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_outboxer_inbox_keeps_the_applications_dict_config(
    app_dir: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = app_dir(DICT_CONFIG)
    result = subprocess.run(
        [str(BIN / "outboxer-inbox"), "logapp:consumer", "--broker", "memory://logapp", "--once"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # outboxer's lines come out, in the application's format.
    assert "APPFORMAT outboxer.consumer consumer logapp started" in result.stderr, result.stderr


def test_json_logs_are_one_object_per_line(
    app_dir: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = app_dir()
    result = subprocess.run(
        [
            str(BIN / "outboxer-inbox"),
            "logapp:consumer",
            "--broker",
            "memory://logapp",
            "--once",
            "--log-format",
            "json",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("1 message," in r["message"] for r in records), records


def test_a_second_ctrl_c_forces_the_exit(
    app_dir: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = app_dir(sleep=120)
    process = start(
        [str(BIN / "outboxer-inbox"), "logapp:consumer", "--broker", "memory://logapp"],
        env,
        tmp_path,
    )
    try:
        wait_for((tmp_path / "mark").exists)  # the handler is sleeping
        process.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert process.poll() is None  # the first one waits for the handler
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 130
        assert "exiting now" in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_outboxer_inbox_waits_for_an_unreachable_broker_one_line_per_attempt(
    app_dir: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = app_dir()
    broker = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    process = start(
        [str(BIN / "outboxer-inbox"), "logapp:consumer", "--broker", broker], env, tmp_path
    )
    try:
        time.sleep(4.0)  # three attempts, at about 0, 1 and 3 seconds
        assert process.poll() is None, "outboxer-inbox gave up on the broker"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        err = process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    attempts = [line for line in err.splitlines() if "cannot reach the broker" in line]
    assert len(attempts) >= 2, err
    assert "(attempt 1; trying again in" in attempts[0]
    assert "Traceback" not in err


@pytest.fixture
def pg_app_url() -> Iterator[str]:
    server = SERVERS["postgresql"]
    require("postgresql", server.available, server.admin_url)
    url = server.create_database("outboxer_logs")
    engine = create_engine(url)
    outboxer.create_all(engine)
    engine.dispose()
    yield url
    server.drop_database(url)


def backlog(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM outboxer_outbox")).scalar_one())


def test_a_multi_line_database_error_is_one_record(pg_app_url: str, tmp_path: Path) -> None:
    Session = sessionmaker(create_engine(pg_app_url), class_=outboxer.OutboxSession)
    with Session.begin() as session:
        session.publish({"n": 1}, type="logs.ping", destination="logs")
    process = start(
        [
            str(BIN / "outboxer"),
            "relay",
            "--broker",
            "memory://logs",
            "--log-format",
            "json",
            "--poll-interval",
            "0.2",
            "--no-listen",
        ],
        {**os.environ, "OUTBOXER_DB": pg_app_url},
        tmp_path,
    )
    engine = create_engine(pg_app_url)
    try:
        # The loop is turning once the relay has sent the message published before it started.
        wait_for(lambda: backlog(engine) == 0)
        with engine.begin() as connection:  # the relay's next claim fails: UndefinedTable
            connection.execute(text("DROP TABLE outboxer_outbox"))
        time.sleep(2.0)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        err = process.stderr.read() if process.stderr else ""
    finally:
        engine.dispose()
        if process.poll() is None:
            process.kill()
            process.wait()
    records = [json.loads(line) for line in err.splitlines()]  # every line is a record
    failures = [r for r in records if "UndefinedTable" in r.get("error", "")]
    assert failures, err
    assert "outboxer_outbox" in failures[0]["error"] and "\n" not in failures[0]["error"]
    assert "traceback" not in failures[0]  # only at --log-level debug
