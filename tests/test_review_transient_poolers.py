"""A connection pooler or proxy in front of the database (PgBouncer, ProxySQL) that cannot
serve a connection now: the database behind it restarts, its pool is full, it shuts down.

PgBouncer answers the client's start-up with its own FATAL ("pgbouncer cannot connect to
server", "server login has been failing, try again later", "no more connections allowed",
"query_wait_timeout", "pgbouncer is shutting down"); ProxySQL with error 9001 ("Max
connect timeout reached while reaching hostgroup"), MySQL with 3032 (offline mode). No
rule knew these words: ``outboxer relay``'s start-up check raised them as a bug (exit 1,
a traceback) while the database behind the pooler merely restarted. A server's refusal
that names the user or the host (no pg_hba.conf entry, not permitted to log in) is the
credentials' problem: exit 5, not "wait".
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from outboxer.diagnosis import diagnose
from outboxer.errors import DatabaseAccessDenied, DatabaseUnavailable

from .refusing_server import refusing_mariadb, refusing_postgresql
from .relaying import output, start_relay, stop, wait_for
from .services import RABBITMQ_URL, port_open, require
from .test_cli_failures import as_process, one_error_line

PGBOUNCER_REFUSALS = [
    "pgbouncer cannot connect to server",
    "server login has been failing, try again later (server_login_retry)",
    "no more connections allowed (max_client_conn)",
    "query_wait_timeout",
    "pgbouncer is shutting down",
    "server shutting down",
]
MYSQL_PROXY_REFUSALS = [
    (9001, "HY000", "Max connect timeout reached while reaching hostgroup 0 after 10000ms"),
    (3032, "HY000", "The server is currently in offline mode"),
]
POSTGRESQL_DENIALS = [
    (
        "28000",
        'no pg_hba.conf entry for host "127.0.0.1", user "app", database "app", no encryption',
    ),
    ("28000", 'role "app" is not permitted to log in'),
    ("42501", 'permission denied for database "app"'),
]


def _connect_error(url: str) -> Exception:
    engine = create_engine(url)
    try:
        engine.connect().close()
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("the refusing server let a connection in")


@pytest.mark.parametrize("message", PGBOUNCER_REFUSALS)
def test_a_pgbouncer_that_cannot_serve_now_is_unavailable(message: str) -> None:
    with refusing_postgresql("08P01", message) as port:
        exc = _connect_error(f"postgresql+psycopg://app@127.0.0.1:{port}/app")
    problem = diagnose(exc)
    assert isinstance(problem, DatabaseUnavailable), exc
    assert not isinstance(problem, DatabaseAccessDenied), problem
    assert message.split(" (", maxsplit=1)[0] in str(problem)  # the pooler's own words


@pytest.mark.parametrize(("errno", "sqlstate", "message"), MYSQL_PROXY_REFUSALS)
def test_a_mysql_proxy_that_cannot_serve_now_is_unavailable(
    errno: int, sqlstate: str, message: str
) -> None:
    with refusing_mariadb(errno, sqlstate, message) as port:
        exc = _connect_error(f"mysql+pymysql://root@127.0.0.1:{port}/app")
    problem = diagnose(exc)
    assert isinstance(problem, DatabaseUnavailable), exc
    assert not isinstance(problem, DatabaseAccessDenied), problem


@pytest.mark.parametrize(("sqlstate", "message"), POSTGRESQL_DENIALS)
def test_a_postgresql_that_refuses_this_user_or_host_is_access_denied(
    sqlstate: str, message: str
) -> None:
    with refusing_postgresql(sqlstate, message) as port:
        exc = _connect_error(f"postgresql+psycopg://app@127.0.0.1:{port}/app")
    assert isinstance(diagnose(exc), DatabaseAccessDenied), exc


def test_relay_once_behind_a_pgbouncer_whose_server_restarts_exits_4_with_one_line() -> None:
    with refusing_postgresql("08P01", "pgbouncer cannot connect to server") as port:
        url = f"postgresql+psycopg://app@127.0.0.1:{port}/app"
        result = as_process("relay", "--once", "--db", url, "--broker", "memory://")
    assert result.returncode == 4, result.stderr
    assert "pgbouncer cannot connect to server" in one_error_line(result)


def test_status_behind_a_full_pgbouncer_exits_4_with_one_line() -> None:
    with refusing_postgresql("08P01", "no more connections allowed (max_client_conn)") as port:
        url = f"postgresql+psycopg://app@127.0.0.1:{port}/app"
        result = as_process("status", env={"OUTBOXER_DB": url})
    assert result.returncode == 4, result.stderr
    assert "no more connections allowed" in one_error_line(result)


def test_a_relay_started_behind_a_pgbouncer_whose_server_restarts_waits_for_it() -> None:
    require("RabbitMQ", port_open("127.0.0.1", 5672), "start: rabbitmq-server -detached")
    with refusing_postgresql("08P01", "pgbouncer cannot connect to server") as port:
        relay = start_relay(f"postgresql+psycopg://app@127.0.0.1:{port}/app", RABBITMQ_URL)
        try:
            wait_for(lambda: "trying again" in output(relay), 30, "the relay to wait")
            assert relay.poll() is None, output(relay)
        finally:
            log = stop(relay)  # exit 0 on SIGTERM while waiting
    assert "Traceback" not in log, log
    assert "pgbouncer cannot connect to server" in log
