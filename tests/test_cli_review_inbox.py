"""outboxer-inbox failures a review found looping or giving tracebacks: an async consumer
on a database without tables (or unreachable, or refusing the user), SQLAlchemy's asyncio
extension missing, a CONSUMER that is not one, a module that fails at import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .cli_apps import BIN, closed_port
from .services import async_url
from .test_cli_failures import one_error_line

ASYNC_APP = """
import os
from dataclasses import dataclass
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
import outboxer

@outboxer.message("reviewasync.ping", destination="reviewasync")
@dataclass
class Ping:
    n: int

engine = create_async_engine(os.environ["REVIEW_ASYNC_DB"])
Session = async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession)
audit = outboxer.Consumer(Session, name="reviewasync")

@audit.handler(Ping)
async def record(event: Ping, session: outboxer.AsyncOutboxSession) -> None:
    pass

# A message waiting on the in-process broker of this process (published through a SQLite
# file of its own), so that the consumer has a delivery to record.
if "REVIEW_ASYNC_SEED" in os.environ:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker
    from outboxer.testing import MemoryBroker, MemoryTransport

    seed = create_engine(os.environ["REVIEW_ASYNC_SEED"])
    outboxer.create_all(seed)
    with sessionmaker(seed, class_=outboxer.OutboxSession).begin() as session:
        session.publish(Ping(1))
    transport = MemoryTransport(MemoryBroker.named("reviewasync"))
    transport.receiver(audit.subscription())
    outboxer.Relay(seed, transport).run(once=True)
"""

NO_GREENLET = (
    "import sys; sys.modules['greenlet'] = None; "
    "from outboxer.cli.inbox import main; main(prog_name='outboxer-inbox')"
)


def inbox(
    tmp_path: Path, *args: str, db: str, python: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``outboxer-inbox ARGS --broker memory://reviewasync --once`` in ``tmp_path``, where
    the application modules are; a run that does not end fails the test."""
    (tmp_path / "reviewasync.py").write_text(textwrap.dedent(ASYNC_APP))
    command = python or [str(BIN / "outboxer-inbox")]
    env = {"REVIEW_ASYNC_DB": db, "REVIEW_ASYNC_SEED": f"sqlite:///{tmp_path / 'seed.sqlite'}"}
    return run_in(tmp_path, [*command, *args, "--broker", "memory://reviewasync", "--once"], env)


def run_in(
    tmp_path: Path, command: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``command`` in ``tmp_path``, where the application modules are, with ``env`` added;
    a run that does not end within 30 s fails the test."""
    try:
        return subprocess.run(
            command,
            env={**os.environ, **env, "PYTHONPATH": str(tmp_path)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} did not exit: {exc.stderr!r}")


def test_an_async_consumer_on_a_database_without_tables_exits_6(
    tmp_path: Path, pg_url: str
) -> None:
    result = inbox(tmp_path, "reviewasync:audit", db=async_url(pg_url))
    assert result.returncode == 6, result.stderr
    assert "outboxer db upgrade" in one_error_line(result)


def test_an_async_consumer_on_an_unreachable_database_exits_4_with_once(tmp_path: Path) -> None:
    db = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/app"
    result = inbox(tmp_path, "reviewasync:audit", db=db)
    assert result.returncode == 4, result.stderr
    assert "cannot reach the database" in one_error_line(result)


def test_an_async_consumer_whose_credentials_are_refused_exits_5(
    tmp_path: Path, pg_url: str
) -> None:
    db = async_url(pg_url).replace("postgres@", "review_fix_no_such_role:pw-hidden@")
    result = inbox(tmp_path, "reviewasync:audit", db=db)
    assert result.returncode == 5, result.stderr
    assert "pw-hidden" not in one_error_line(result)


def test_an_async_consumer_without_the_asyncio_extra_is_one_line_exit_3(
    tmp_path: Path, pg_url: str
) -> None:
    result = inbox(
        tmp_path,
        "reviewasync:audit",
        db=async_url(pg_url),
        python=[sys.executable, "-c", NO_GREENLET],
    )
    assert result.returncode == 3, result.stderr
    assert "outboxer[asyncio]" in one_error_line(result)


MODULES = {
    "review_runtime": 'raise RuntimeError("boom at import")\n',
    "review_syntax": "def f(:\n",
    "review_keyerror": 'import os\nos.environ["REVIEW_NO_SUCH_VARIABLE"]\n',
}


@pytest.mark.parametrize(
    ("module", "error"),
    [
        ("review_runtime", "RuntimeError"),
        ("review_syntax", "SyntaxError"),
        ("review_keyerror", "KeyError"),
    ],
)
def test_a_module_failing_at_import_is_one_line_naming_it(
    tmp_path: Path, module: str, error: str
) -> None:
    (tmp_path / f"{module}.py").write_text(MODULES[module])
    result = inbox(tmp_path, f"{module}:consumer", db="sqlite://")
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert module in line and error in line, line
    relay = run_in(
        tmp_path,
        [str(BIN / "outboxer"), "relay", "--on-failure", f"{module}:alert", "--once"],
        {"OUTBOXER_DB": "sqlite://", "OUTBOXER_BROKER": "memory://"},
    )
    assert relay.returncode == 2, relay.stderr
    line = one_error_line(relay)
    assert module in line and error in line, line


def test_a_class_given_as_the_consumer_is_one_line_naming_it(tmp_path: Path) -> None:
    result = inbox(tmp_path, "reviewasync:Ping", db="sqlite+aiosqlite://")
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert "reviewasync:Ping" in line and "Consumer" in line, line
