"""Operator failures on the command line: one line naming the fix, a distinct exit code,
the traceback only at --log-level debug; and no secret in anything printed."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import create_engine

import outboxer
from outboxer.cli import main

from .cli_apps import closed_port
from .services import RABBITMQ_URL, SERVERS, port_open, require

OUTBOXER = [str(Path(sys.executable).parent / "outboxer")]


def as_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``outboxer ARGS`` as an operator would (a process: real exit code, real stderr)."""
    return subprocess.run(
        [*OUTBOXER, *args],
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def outboxer_cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    """Run ``outboxer ARGS`` in this process (quicker; the exit code and output are the same)."""
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "200", **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def one_error_line(result: Ran | subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_status_on_an_unreachable_database_is_one_line_and_exit_4() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/app"
    result = as_process("status", env={"OUTBOXER_DB": url})
    assert result.returncode == 4, result.stderr
    assert "cannot reach the database" in one_error_line(result)
    assert len(result.stderr.splitlines()) == 1


def test_the_traceback_appears_only_at_debug_level() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/app"
    result = as_process("status", "--log-level", "debug", env={"OUTBOXER_DB": url})
    assert result.returncode == 4
    assert "Traceback" in result.stderr and "OperationalError" in result.stderr


def test_status_and_relay_on_a_database_without_tables_say_to_run_db_upgrade(
    pg_url: str,
) -> None:
    for command in (["status"], ["relay", "--broker", "memory://", "--once"]):
        result = outboxer_cli(*command, env={"OUTBOXER_DB": pg_url})
        assert result.returncode == 6, result.stderr
        line = one_error_line(result)
        assert "the outboxer tables are missing" in line
        assert "run `outboxer db upgrade --db postgresql+psycopg://" in line


def test_refused_database_credentials_exit_5(pg_url: str) -> None:
    url = pg_url.replace("postgres@", "no_such_role:secret@")
    result = outboxer_cli("status", env={"OUTBOXER_DB": url})
    assert result.returncode == 5, result.stderr
    line = one_error_line(result)
    assert "refused the credentials" in line and "secret" not in line


def test_a_missing_database_names_the_fix(pg_url: str) -> None:
    result = outboxer_cli("status", env={"OUTBOXER_DB": pg_url + "_gone"})
    assert result.returncode == 4
    assert "does not exist" in one_error_line(result)


def test_relay_once_with_an_unreachable_broker_exits_7_even_with_an_empty_outbox(
    sqlite_url: str,
) -> None:
    broker = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    result = outboxer_cli(
        "relay", "--once", env={"OUTBOXER_DB": sqlite_url, "OUTBOXER_BROKER": broker}
    )
    assert result.returncode == 7, result.stderr
    assert "cannot reach the broker" in one_error_line(result)


def test_relay_once_with_refused_broker_credentials_exits_8(sqlite_url: str) -> None:
    require("rabbitmq", port_open("127.0.0.1", 5672), RABBITMQ_URL)
    broker = "amqp://guest:not-the-password@127.0.0.1:5672/"
    result = outboxer_cli(
        "relay", "--once", env={"OUTBOXER_DB": sqlite_url, "OUTBOXER_BROKER": broker}
    )
    assert result.returncode == 8, result.stderr
    line = one_error_line(result)
    assert "refused the credentials" in line and "not-the-password" not in result.stderr


def test_an_invalid_url_exits_3_with_its_password_masked(sqlite_url: str) -> None:
    # An unencoded '/' and '#' in the password: URL parsers take it for path and fragment.
    broker = "amqp://guest:pa/ss#w0rd@127.0.0.1:5672/"
    result = outboxer_cli(
        "relay", "--once", env={"OUTBOXER_DB": sqlite_url, "OUTBOXER_BROKER": broker}
    )
    assert result.returncode == 3, result.stderr
    line = one_error_line(result)
    assert "percent-encode" in line
    assert "pa/ss" not in result.stderr and "w0rd" not in result.stderr and "'pa'" not in line
    result = outboxer_cli("status", env={"OUTBOXER_DB": "not a url"})
    assert result.returncode == 3
    assert "not a database URL" in one_error_line(result)


def test_a_password_in_a_query_parameter_is_masked_by_status_and_the_relay(
    pg_url: str,
) -> None:
    outboxer.create_all(create_engine(pg_url))
    secret_db = pg_url + "?password=hunter2&sslmode=disable"  # libpq takes it; trust ignores it
    status = outboxer_cli("status", env={"OUTBOXER_DB": secret_db})
    assert status.returncode == 0, status.stderr
    assert "password=***" in status.stdout
    relay = as_process(
        "relay",
        "--once",
        env={
            "OUTBOXER_DB": secret_db,
            "OUTBOXER_BROKER": "memory://?aws_secret_access_key=s3cr3t&discard=true",
        },
    )
    assert relay.returncode == 0, relay.stderr
    assert "relay" in relay.stderr and "started" in relay.stderr
    printed = status.stdout + status.stderr + relay.stdout + relay.stderr
    for secret in ("hunter2", "s3cr3t"):
        assert secret not in printed


def test_mariadb_failures_are_named_too() -> None:
    server = SERVERS["mariadb"]
    require("mariadb", server.available, server.admin_url)
    base = server.admin_url.rsplit("/", 1)[0]
    missing = outboxer_cli("status", env={"OUTBOXER_DB": base + "/no_such_database_here"})
    assert missing.returncode == 4 and "does not exist" in one_error_line(missing)
    refused = outboxer_cli(
        "status", env={"OUTBOXER_DB": base.replace("root@", "root:wrong-pw@") + "/test"}
    )
    assert refused.returncode == 5, refused.stderr
    assert "wrong-pw" not in refused.stderr


def test_a_sqlite_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.sqlite'}"
    result = outboxer_cli("status", env={"OUTBOXER_DB": url})
    assert result.returncode == 4
    assert "cannot open the SQLite database file" in one_error_line(result)
