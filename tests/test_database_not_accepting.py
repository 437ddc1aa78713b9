"""A database that answers but does not take connections now: PostgreSQL shutting down,
starting up or in recovery, too many clients; MariaDB shutting down or full.

CI found ``outboxer relay`` dead (exit 1, a traceback) beside a consumer while PostgreSQL
restarted: its start-up check met "FATAL: the database system is shutting down", which
no rule recognised, so the check raised it as a bug instead of waiting. Such a database
is unreachable for now: a long-running process waits for it, a one-shot run exits 4 with
one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from outboxer.diagnosis import diagnose
from outboxer.errors import DatabaseUnavailable
from outboxer.relay import relay_engine

from .refusing_server import connect_error, refusing_mariadb, refusing_postgresql, silent_server
from .relaying import OUTBOXER, output, spawn, start_relay, stop, wait_for
from .services import RABBITMQ_URL, port_open, require
from .test_cli_failures import as_process, one_error_line

INBOX = str(Path(OUTBOXER).parent / "outboxer-inbox")

POSTGRESQL_STATES = [
    ("57P03", "the database system is shutting down"),
    ("57P03", "the database system is starting up"),
    ("57P03", "the database system is not yet accepting connections"),
    ("57P03", "the database system is in recovery mode"),
    ("53300", "sorry, too many clients already"),
    ("57P01", "terminating connection due to administrator command"),
]
MARIADB_STATES = [
    (1053, "08S01", "Server shutdown in progress"),
    (1040, "08004", "Too many connections"),
    (1203, "42000", "User app already has more than 'max_user_connections' active connections"),
]


@pytest.mark.parametrize(("sqlstate", "message"), POSTGRESQL_STATES)
def test_a_postgresql_not_accepting_connections_now_is_unavailable(
    sqlstate: str, message: str
) -> None:
    with refusing_postgresql(sqlstate, message) as port:
        exc = connect_error(f"postgresql+psycopg://postgres@127.0.0.1:{port}/app")
    problem = diagnose(exc, db_url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/app")
    assert isinstance(problem, DatabaseUnavailable), exc
    assert message in str(problem)  # the server's own words, not "is it running?"


@pytest.mark.parametrize(("errno", "sqlstate", "message"), MARIADB_STATES)
def test_a_mariadb_not_accepting_connections_now_is_unavailable(
    errno: int, sqlstate: str, message: str
) -> None:
    with refusing_mariadb(errno, sqlstate, message) as port:
        exc = connect_error(f"mysql+pymysql://root@127.0.0.1:{port}/app")
    problem = diagnose(exc)
    assert isinstance(problem, DatabaseUnavailable), exc
    assert message in str(problem)


REFUSED_NOW = [
    ("57P03", "the database system is shutting down"),
    ("08P01", "pgbouncer cannot connect to server"),  # a PgBouncer whose server restarts
]


@pytest.mark.parametrize(("sqlstate", "message"), REFUSED_NOW)
def test_relay_once_against_a_database_that_takes_no_connection_now_exits_4_with_one_line(
    sqlstate: str, message: str
) -> None:
    with refusing_postgresql(sqlstate, message) as port:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/app"
        result = as_process("relay", "--once", "--db", url, "--broker", "memory://?discard=true")
    assert result.returncode == 4, result.stderr
    assert message in one_error_line(result)


@pytest.mark.parametrize(("sqlstate", "message"), REFUSED_NOW)
def test_a_relay_started_while_its_database_takes_no_connection_waits_for_it(
    sqlstate: str, message: str
) -> None:
    require("RabbitMQ", port_open("127.0.0.1", 5672), "start: rabbitmq-server -detached")
    with refusing_postgresql(sqlstate, message) as port:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/app"
        relay = start_relay(url, RABBITMQ_URL)
        try:
            wait_for(lambda: "trying again" in output(relay), 30, "the relay to wait")
            assert relay.poll() is None, output(relay)
        finally:
            log = stop(relay)  # exit 0 on SIGTERM while waiting
    assert "Traceback" not in log, log
    assert message in log


def test_inbox_started_while_postgresql_shuts_down_waits_for_it() -> None:
    with refusing_postgresql("57P03", "the database system is shutting down") as port:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/app"
        env = {**os.environ, "APP_DB": url, "APP_DESTINATION": "d", "APP_CONSUMER": "c"}
        consumer = spawn([INBOX, "tests.consumer_app:consumer", "--broker", "memory://c"], env=env)
        try:
            wait_for(lambda: "trying again" in output(consumer), 30, "the consumer to wait")
        finally:
            consumer.send_signal(signal.SIGTERM)
            try:
                consumer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                consumer.kill()
                raise
        log = output(consumer)
    assert consumer.returncode == 0, log
    assert "Traceback" not in log, log


def test_a_relay_connection_to_a_database_that_never_answers_fails_in_time() -> None:
    """libpq waits for the server's first answer forever unless told otherwise: a relay
    started against a hung PostgreSQL never even logged that it was waiting."""
    with silent_server() as port:
        engine = relay_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/app", network_timeout=2
        )
        started = time.monotonic()
        with pytest.raises(OperationalError):
            engine.connect().close()
        engine.dispose()
    assert time.monotonic() - started < 15


def test_a_connect_timeout_in_the_url_is_the_operators() -> None:
    with silent_server() as port:
        engine = relay_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/app?connect_timeout=2",
            network_timeout=120,
        )
        started = time.monotonic()
        with pytest.raises(OperationalError):
            engine.connect().close()
        engine.dispose()
    assert time.monotonic() - started < 15  # the URL's 2 s, not 120


def test_a_start_up_check_that_gets_no_answer_says_so_and_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An application engine without connect_timeout, against a server that accepts and
    never answers: libpq waits forever, and `outboxer-inbox` used to log nothing at all."""
    from sqlalchemy import create_engine, text

    from outboxer.cli import readiness

    monkeypatch.setattr(readiness, "_QUIET_AFTER", 0.5, raising=False)
    stop = threading.Event()
    with silent_server() as port:
        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/app")

        def check() -> None:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        waiting = threading.Thread(
            target=readiness.wait_until, args=([check],), kwargs={"wait": True, "stop": stop}
        )
        with caplog.at_level("WARNING", logger="outboxer.cli"):
            waiting.start()
            deadline = time.monotonic() + 10
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            waiting.join(5)
    assert not waiting.is_alive()
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    line = record.getMessage()
    assert "no answer" in line and "connect_timeout" in line, line
    assert "\n" not in line


READ_ONLY = {
    "postgresql": "options=-cdefault_transaction_read_only%3Don",
    "mariadb": "init_command=SET%20SESSION%20TRANSACTION%20READ%20ONLY",
}


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_a_read_only_database_is_one_line_naming_the_primary(kind: str) -> None:
    """A replica, a reader endpoint, or read-only sessions (a failed-over primary): the relay's
    first write failed with a traceback and exit 1 (`--once`), and a running relay logged
    "database trouble" without saying what to do."""
    from .services import SERVERS

    server = SERVERS[kind]
    require(kind, server.available, server.admin_url)
    url = server.create_database("outboxer_ro")
    try:
        assert as_process("db", "upgrade", env={"OUTBOXER_DB": url}).returncode == 0
        read_only = f"{url}?{READ_ONLY[kind]}"
        env = {"OUTBOXER_DB": read_only, "OUTBOXER_BROKER": "memory://?discard=true"}
        result = as_process("relay", "--once", env=env)
        assert result.returncode == 4, result.stderr
        line = one_error_line(result)
        assert "read-only" in line and "primary" in line, line
    finally:
        server.drop_database(url)


def test_a_running_relay_on_a_read_only_database_says_what_to_do(pg_url: str) -> None:
    assert as_process("db", "upgrade", env={"OUTBOXER_DB": pg_url}).returncode == 0
    relay = start_relay(f"{pg_url}?{READ_ONLY['postgresql']}", "memory://?discard=true")
    try:
        wait_for(lambda: "read-only" in output(relay), 30, "the relay's warning")
    finally:
        log = stop(relay)
    warning = next(line for line in log.splitlines() if "read-only" in line)
    assert "WARNING" in warning and "primary" in warning, warning
    assert "Traceback" not in log, log


@pytest.mark.parametrize("relay", ["--relay", "--no-relay"])
def test_inbox_once_on_a_read_only_database_exits_4_naming_the_primary(
    pg_url: str, relay: str
) -> None:
    """`outboxer-inbox --no-relay` on a replica passed its start-up check (it only reads),
    then gave every message back forever, logging "writing a simpler one" (`--once` never
    ended). With its own relay, the relay's first write said so, but named only --db /
    OUTBOXER_DB, which `outboxer-inbox` does not take."""
    assert as_process("db", "upgrade", env={"OUTBOXER_DB": pg_url}).returncode == 0
    env = {
        **os.environ,
        "APP_DB": f"{pg_url}?{READ_ONLY['postgresql']}",
        "APP_DESTINATION": "d",
        "APP_CONSUMER": "c",
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [INBOX, "tests.consumer_app:consumer", "--broker", "memory://c", "--once", relay],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 4, result.stderr
    line = one_error_line(result)
    assert "read-only" in line and "primary" in line and "commands: --db" in line, line


def test_a_consumer_whose_database_turned_read_only_gives_messages_back_saying_so(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failover under a running consumer: its database takes no write. That refuses no
    particular row, so no "simpler row" is written in its place: the delivery goes back,
    and the warning says what is wrong."""
    import logging
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    import outboxer
    from outboxer.publishing import build_message
    from outboxer.testing import MemoryBroker, MemoryTransport

    from .models import Base, OrderPlaced

    setup = create_engine(pg_url)
    outboxer.create_all(setup)
    Base.metadata.create_all(setup)
    setup.dispose()
    engine = create_engine(f"{pg_url}?{READ_ONLY['postgresql']}")
    destination = f"d-{uuid.uuid4().hex[:8]}"
    consumer = outboxer.Consumer(sessionmaker(engine, class_=outboxer.OutboxSession), name="ro")

    @consumer.handler(OrderPlaced, destination=destination)
    def reserve(event: OrderPlaced) -> None:
        pass

    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.receiver(consumer.subscription()).close()
    transport.send([build_message(OrderPlaced(order_id=1), destination=destination).envelope])
    caplog.set_level(logging.INFO, logger="outboxer")
    stop = threading.Timer(3.0, consumer.stop)
    stop.start()
    try:
        consumer.run(transport, concurrency=1)
    finally:
        stop.cancel()
        engine.dispose()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [line for line in lines if "simpler one" in line], lines
    assert any("read-only" in line and "primary" in line for line in lines), lines
    assert broker.queue_depth(consumer.subscription().queue) == 1  # given back, not lost
