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

from outboxer.diagnosis import diagnose
from outboxer.errors import DatabaseAccessDenied, DatabaseUnavailable

from .refusing_server import connect_error, refusing_mariadb, refusing_postgresql
from .test_cli_failures import as_process, one_error_line

# The relay's one-shot exit and its wait, behind a PgBouncer whose server restarts, are
# tests/test_database_not_accepting.py's (REFUSED_NOW).
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


@pytest.mark.parametrize("message", PGBOUNCER_REFUSALS)
def test_a_pgbouncer_that_cannot_serve_now_is_unavailable(message: str) -> None:
    with refusing_postgresql("08P01", message) as port:
        exc = connect_error(f"postgresql+psycopg://app@127.0.0.1:{port}/app")
    problem = diagnose(exc)
    assert isinstance(problem, DatabaseUnavailable), exc
    assert not isinstance(problem, DatabaseAccessDenied), problem
    assert message.split(" (", maxsplit=1)[0] in str(problem)  # the pooler's own words


@pytest.mark.parametrize(("errno", "sqlstate", "message"), MYSQL_PROXY_REFUSALS)
def test_a_mysql_proxy_that_cannot_serve_now_is_unavailable(
    errno: int, sqlstate: str, message: str
) -> None:
    with refusing_mariadb(errno, sqlstate, message) as port:
        exc = connect_error(f"mysql+pymysql://root@127.0.0.1:{port}/app")
    problem = diagnose(exc)
    assert isinstance(problem, DatabaseUnavailable), exc
    assert not isinstance(problem, DatabaseAccessDenied), problem


@pytest.mark.parametrize(("sqlstate", "message"), POSTGRESQL_DENIALS)
def test_a_postgresql_that_refuses_this_user_or_host_is_access_denied(
    sqlstate: str, message: str
) -> None:
    with refusing_postgresql(sqlstate, message) as port:
        exc = connect_error(f"postgresql+psycopg://app@127.0.0.1:{port}/app")
    assert isinstance(diagnose(exc), DatabaseAccessDenied), exc


def test_status_behind_a_full_pgbouncer_exits_4_with_one_line() -> None:
    with refusing_postgresql("08P01", "no more connections allowed (max_client_conn)") as port:
        url = f"postgresql+psycopg://app@127.0.0.1:{port}/app"
        result = as_process("status", env={"OUTBOXER_DB": url})
    assert result.returncode == 4, result.stderr
    assert "no more connections allowed" in one_error_line(result)
