"""Database failures a review found giving tracebacks or the wrong diagnosis: a password
with an unencoded '@', privileges refused, connection options the driver rejects, a port
that speaks another protocol. Each is one line naming the fix, with its exit code."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from outboxer import schema
from outboxer.cli.common import make_engine
from outboxer.diagnosis import diagnose
from outboxer.errors import DatabaseAccessDenied, InvalidURL

from .services import RABBITMQ_URL, SERVERS, port_open, require
from .test_cli_failures import as_process, one_error_line, outboxer_cli

AT_IN_PASSWORD = "postgresql+psycopg://nouser:s3cr@tSECRET@127.0.0.1:5432/db"


def test_make_engine_refuses_an_unencoded_at_in_the_password() -> None:
    with pytest.raises(InvalidURL) as caught:
        make_engine(AT_IN_PASSWORD)
    assert "percent-encode" in str(caught.value)
    assert "SECRET" not in str(caught.value) and "s3cr" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://postgres:pw@127.0.0.1:5432/db?application_name=ops@billing",
        "postgresql+psycopg://postgres:p%40ss@127.0.0.1:5432/db",
        "postgresql+psycopg://us@er:pw@127.0.0.1:5432/db",  # SQLAlchemy: user "us@er"
    ],
)
def test_urls_with_an_at_sqlalchemy_parses_right_are_accepted(url: str) -> None:
    """Found attacking the first fix: an '@' in the query string was taken for one in the
    password, and a valid URL refused (exit 3)."""
    engine = make_engine(url)
    assert engine.url.host == "127.0.0.1"
    engine.dispose()


@pytest.mark.parametrize("command", [["status"], ["db", "current"], ["relay", "--once"]])
def test_an_unencoded_at_in_the_database_password_is_a_bad_url_and_never_printed(
    command: list[str],
) -> None:
    result = as_process(
        *command,
        "--log-level",
        "debug",
        env={"OUTBOXER_DB": AT_IN_PASSWORD, "OUTBOXER_BROKER": "memory://"},
    )
    assert result.returncode == 3, result.stderr
    assert "percent-encode" in result.stderr
    printed = result.stdout + result.stderr
    assert "SECRET" not in printed and "s3cr" not in printed


@dataclass
class Denied:
    """A database owned by postgres, and a role allowed to connect to it, nothing more."""

    owner_url: str
    role_url: str


@pytest.fixture
def denied() -> Iterator[Denied]:
    server = SERVERS["postgresql"]
    require("postgresql", server.available, server.admin_url)
    suffix = uuid.uuid4().hex[:8]
    role, database = f"review_fix_r_{suffix}", f"review_fix_db_{suffix}"
    admin = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{suffix}'"))
        connection.execute(text(f"CREATE DATABASE {database}"))
    owner = make_url(server.admin_url).set(database=database)
    as_role = owner.set(username=role, password=f"pw-{suffix}")
    try:
        yield Denied(
            owner.render_as_string(hide_password=False),
            as_role.render_as_string(hide_password=False),
        )
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            connection.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


def _assert_privileges_line(result: object, password: str) -> None:
    line = one_error_line(result)  # type: ignore[arg-type]
    assert "privileges" in line and "grant" in line, line
    assert password not in line


def test_db_upgrade_without_the_right_to_create_tables_is_access_denied(denied: Denied) -> None:
    result = outboxer_cli("db", "upgrade", env={"OUTBOXER_DB": denied.role_url})
    assert result.returncode == 5, result.stderr
    _assert_privileges_line(result, make_url(denied.role_url).password or "")


@pytest.mark.parametrize(
    "command",
    [
        ["db", "upgrade"],
        ["status"],
        ["db", "current"],
        ["relay", "--broker", "memory://", "--once"],
    ],
)
def test_commands_on_tables_the_user_may_not_read_say_grant_privileges(
    denied: Denied, command: list[str]
) -> None:
    engine = create_engine(denied.owner_url)
    schema.upgrade(engine)
    engine.dispose()
    result = outboxer_cli(*command, env={"OUTBOXER_DB": denied.role_url})
    assert result.returncode == 5, result.stderr
    _assert_privileges_line(result, make_url(denied.role_url).password or "")


def _pg_base() -> str:
    server = SERVERS["postgresql"]
    require("postgresql", server.available, server.admin_url)
    return server.admin_url


@pytest.mark.parametrize(
    "query", ["sslmode=bogus", "foo=bar", "connect_timeout=abc", "sslmode=require"]
)
def test_a_connection_option_the_driver_rejects_is_a_bad_url(query: str) -> None:
    base = _pg_base()
    if query == "sslmode=require":
        with create_engine(base).connect() as connection:
            if connection.execute(text("SHOW ssl")).scalar() == "on":
                pytest.skip("this PostgreSQL server supports SSL")
    result = outboxer_cli("status", env={"OUTBOXER_DB": f"{base}?{query}"})
    assert result.returncode == 3, result.stderr
    line = one_error_line(result)
    assert "query" in line or "sslmode" in line, line


def test_a_mariadb_charset_the_driver_does_not_know_is_a_bad_url() -> None:
    server = SERVERS["mariadb"]
    require("mariadb", server.available, server.admin_url)
    result = outboxer_cli("status", env={"OUTBOXER_DB": f"{server.admin_url}?charset=bogus"})
    assert result.returncode == 3, result.stderr
    assert "charset" in one_error_line(result)


def test_a_port_that_speaks_another_protocol_is_unreachable_and_named() -> None:
    _pg_base()
    require("rabbitmq", port_open("127.0.0.1", 5672), RABBITMQ_URL)
    result = outboxer_cli(
        "status", env={"OUTBOXER_DB": "postgresql+psycopg://postgres@127.0.0.1:5672/app"}
    )
    assert result.returncode == 4, result.stderr
    line = one_error_line(result)
    assert "port" in line and "5672" in line, line


class _PsycopgError(Exception):
    """Stands in for a psycopg error (diagnosis reads the module and the SQLSTATE)."""

    __module__ = "psycopg.errors"

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class _PyMySQLError(Exception):
    __module__ = "pymysql.err"


def test_the_rules_for_options_and_privileges_stay_narrow() -> None:
    enum = _PsycopgError('invalid input value for enum colour: "mauve"', "22P02")
    assert diagnose(enum) is None  # the data's problem, not the URL's
    late = _PsycopgError('invalid value for parameter "statement_timeout": "abc"', "22023")
    assert diagnose(late) is None  # a SET at run time, not a connection option
    denied = diagnose(
        _PyMySQLError(1142, "SELECT command denied to user 'app'@'%' for table 'outboxer_outbox'")
    )
    assert isinstance(denied, DatabaseAccessDenied) and denied.exit_code == 5
    assert "grant" in str(denied)
