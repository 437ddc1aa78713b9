"""The long-running commands as processes: logging, broker outages at start, Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.cli import logs

from .cli_apps import BIN, DICT_CONFIG, closed_port, inbox_once, logapp_env, running, wait_for
from .services import SERVERS, require


def test_outboxer_inbox_keeps_the_applications_dict_config(tmp_path: Path) -> None:
    result = inbox_once(tmp_path, logapp_env(tmp_path, DICT_CONFIG))
    assert result.returncode == 0, result.stderr
    # outboxer's lines come out, in the application's format.
    assert "APPFORMAT outboxer.consumer consumer logapp started" in result.stderr, result.stderr


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    result = inbox_once(tmp_path, logapp_env(tmp_path), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("1 message," in r["message"] for r in records), records


def test_a_second_ctrl_c_forces_the_exit(tmp_path: Path) -> None:
    env = logapp_env(tmp_path, sleep=120)
    inbox = [str(BIN / "outboxer-inbox"), "logapp:consumer", "--broker", "memory://logapp"]
    with running(inbox, env, tmp_path) as process:
        wait_for((tmp_path / "mark").exists)  # the handler is sleeping
        process.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert process.poll() is None  # the first one waits for the handler
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 130
        assert "exiting now" in (process.stderr.read() if process.stderr else "")


def test_outboxer_inbox_waits_for_an_unreachable_broker_one_line_per_attempt(
    tmp_path: Path,
) -> None:
    broker = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    inbox = [str(BIN / "outboxer-inbox"), "logapp:consumer", "--broker", broker]
    log = tmp_path / "stderr.log"

    def attempts() -> list[str]:
        return [line for line in log.read_text().splitlines() if "cannot reach" in line]

    with log.open("w") as err, running(inbox, logapp_env(tmp_path), tmp_path, err) as process:
        wait_for(lambda: len(attempts()) >= 2, seconds=60)
        assert process.poll() is None, "outboxer-inbox gave up on the broker"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    assert "(attempt 1; trying again in" in attempts()[0]
    assert "(attempt 2; trying again in" in attempts()[1]
    assert "Traceback" not in log.read_text()


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
    relay = [
        str(BIN / "outboxer"),
        "relay",
        "--broker",
        "memory://logs?discard=true",
        "--no-listen",
    ]
    relay += ["--log-format", "json", "--poll-interval", "0.2"]
    engine = create_engine(pg_app_url)
    with running(relay, {**os.environ, "OUTBOXER_DB": pg_app_url}, tmp_path) as process:
        # The loop is turning once the relay has sent the message published before it started.
        wait_for(lambda: backlog(engine) == 0)
        # Cut the relay's connections to this test's own database: psycopg's error for that
        # spans several lines ("terminating connection...", "server closed the connection").
        with engine.begin() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        time.sleep(3.0)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        err = process.stderr.read() if process.stderr else ""
    engine.dispose()
    records = [json.loads(line) for line in err.splitlines()]  # every line is a record
    troubles = [r for r in records if r["level"] in ("WARNING", "ERROR")]
    assert troubles, err
    assert all("\n" not in r["message"] and "\n" not in r.get("error", "") for r in records)
    assert all("traceback" not in r for r in records)  # only at --log-level debug


def test_the_formatters_write_one_line_per_record() -> None:
    try:
        raise RuntimeError("connection failed\nDETAIL: the server closed it\n[SQL: SELECT 1]")
    except RuntimeError:
        record = logging.LogRecord(
            "outboxer.relay",
            logging.WARNING,
            __file__,
            1,
            "a batch failed:\n%s",
            ("why",),
            sys.exc_info(),
        )
    text_line = logs.TextFormatter(tracebacks=False).format(record)
    assert "\n" not in text_line
    assert "a batch failed: | why (RuntimeError: connection failed | DETAIL: " in text_line
    entry = json.loads(logs.JsonFormatter(tracebacks=False).format(record))
    assert entry["message"] == "a batch failed: | why" and "traceback" not in entry
    assert "Traceback" in logs.JsonFormatter(tracebacks=True).format(record)
