"""--health-port, --metrics-port and status --max-lag, against the running processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.cli import main
from outboxer.cli.health import HealthServer

from .cli_apps import BIN, closed_port, logapp_env, running, wait_for


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def answers(port: int, path: str, status: int) -> Callable[[], bool]:
    return lambda: get(port, path)[0] == status


def publish(url: str, count: int) -> None:
    engine = create_engine(url)
    outboxer.create_all(engine)
    with sessionmaker(engine, class_=outboxer.OutboxSession).begin() as session:
        for n in range(count):
            session.publish({"n": n}, type="health.ping", destination="health")
    engine.dispose()


def test_relay_serves_liveness_readiness_and_prometheus_metrics(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite"
    publish(f"sqlite:///{path}", 3)
    health, metrics = closed_port(), closed_port()
    relay = [
        str(BIN / "outboxer"),
        "relay",
        "--broker",
        "memory://health?discard=true",
        "--poll-interval",
    ]
    relay += ["0.2", "--health-port", f"127.0.0.1:{health}", "--metrics-port", str(metrics)]
    env = {**os.environ, "OUTBOXER_DB": f"sqlite:///{path}"}
    with running(relay, env, tmp_path, subprocess.DEVNULL) as process:
        wait_for(answers(health, "/live", 200))
        status, body = get(health, "/ready")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        wait_for(lambda: "messaging_client_sent_messages" in get(metrics, "/metrics")[1])
        exposition = get(metrics, "/metrics")[1]
        assert "# TYPE messaging_client_sent_messages_total counter" in exposition
        assert "outboxer_outbox_backlog" in exposition

        # The database loses outboxer's tables: not ready, with the reason; still alive.
        with sqlite3.connect(path) as connection:
            connection.execute("DROP TABLE outboxer_dead_letter")
        wait_for(answers(health, "/ready", 503), seconds=30)
        problem = json.loads(get(health, "/ready")[1])["problem"]
        assert "the outboxer tables are missing (outboxer_dead_letter)" in problem
        assert get(health, "/live")[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_outboxer_inbox_serves_health_and_metrics(tmp_path: Path) -> None:
    health, metrics = closed_port(), closed_port()
    inbox = [str(BIN / "outboxer-inbox"), "logapp:consumer", "--broker", "memory://logapp"]
    inbox += ["--health-port", str(health), "--metrics-port", str(metrics)]
    with running(inbox, logapp_env(tmp_path), tmp_path, subprocess.DEVNULL) as process:
        wait_for(answers(health, "/live", 200))
        assert get(health, "/ready")[0] == 200
        wait_for(lambda: "messaging_process_duration" in get(metrics, "/metrics")[1])
        assert get(health, "/nowhere")[0] == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_liveness_fails_when_the_loop_stops_turning() -> None:
    age = [1.0]
    server = HealthServer(
        ("127.0.0.1", 0), liveness=lambda: age[0], liveness_timeout=10.0, checks=[]
    ).start()
    try:
        assert get(server.port, "/live")[0] == 200
        age[0] = 11.0
        status, body = get(server.port, "/live")
        assert status == 503 and json.loads(body)["status"] == "stuck"
    finally:
        server.close()


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'busy.sqlite'}"
    publish(url, 0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            main,
            ["relay", "--once", "--broker", "memory://", "--health-port", f"127.0.0.1:{port}"],
            env={"OUTBOXER_DB": url},
        )
    assert result.exit_code == 3, result.output
    assert f"cannot serve health checks on 127.0.0.1:{port}" in result.output


@pytest.mark.parametrize(("max_lag", "code"), [("1", 9), ("1h", 0)])
def test_status_max_lag_exits_9_past_the_lag(tmp_path: Path, max_lag: str, code: int) -> None:
    url = f"sqlite:///{tmp_path / 'lag.sqlite'}"
    publish(url, 1)
    time.sleep(1.5)
    result = CliRunner().invoke(main, ["status", "--max-lag", max_lag], env={"OUTBOXER_DB": url})
    assert result.exit_code == code, result.output
    if code:
        assert "more than --max-lag 1 s" in result.output
