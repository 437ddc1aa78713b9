"""What a user gets from the wheel: it installs with only the extras they ask for, and runs.

``make test`` installs ``.[dev]``, which hides a missing dependency declaration; these tests
build the wheel and install it into a fresh virtualenv, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from sqlalchemy import create_engine, inspect

from .services import SERVERS, require

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def test_sync_use_needs_no_greenlet(tmp_path: Path) -> None:
    """SQLAlchemy 2.1 no longer installs greenlet; publishing and relaying must not need it."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["greenlet"] = None  # as on an install without SQLAlchemy's asyncio extra
        from dataclasses import dataclass
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session, sessionmaker
        import outboxer
        from outboxer import async_support
        from outboxer.testing import MemoryBroker, MemoryTransport

        @outboxer.message("nogreenlet.ping", destination="pings")
        @dataclass
        class Ping:
            n: int

        engine = create_engine("sqlite:///{tmp_path / "app.sqlite"}")
        outboxer.create_all(engine)
        with sessionmaker(engine, class_=outboxer.OutboxSession).begin() as session:
            session.publish(Ping(1))
        try:
            outboxer.publish(Session(engine), Ping(2))
        except outboxer.NotAnOutboxSession:
            pass
        else:
            raise AssertionError("a plain Session published")
        broker = MemoryBroker.named("nogreenlet")
        outboxer.Relay(engine, MemoryTransport(broker)).run(once=True)
        assert len(broker.published) == 1, broker.published
        if not async_support.AVAILABLE:  # SQLAlchemy 2.1+: asyncio refuses to load
            try:
                outboxer.AsyncOutboxSession()
            except outboxer.ConfigurationError as exc:
                assert "outboxer[asyncio]" in str(exc), exc
            else:
                raise AssertionError("AsyncOutboxSession() worked without greenlet")
        print("ok")
        """
    )
    assert run(sys.executable, "-c", script, cwd=tmp_path).strip() == "ok"


def test_the_wheel_installs_with_two_extras_and_migrates_a_fresh_database(
    tmp_path: Path,
) -> None:
    """Build the wheel, install it with only ``[postgresql,rabbitmq]`` into a new virtualenv,
    then run the commands a new user runs first, outside the checkout (so the migrations can
    only come from the wheel)."""
    server = SERVERS["postgresql"]
    require("postgresql", server.available, server.admin_url)
    dist = tmp_path / "dist"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        dist,
        ROOT,
        cwd=tmp_path,
    )
    [wheel] = dist.glob("outboxer-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.namelist()
    assert "outboxer/_migrations/env.py" in shipped
    assert any(n.startswith("outboxer/_migrations/versions/0001") for n in shipped)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    # The test run's pip installs into the new environment (quicker than bootstrapping one);
    # the pip cache keeps this to seconds after the first run.
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        f"{wheel}[postgresql,rabbitmq]",
        cwd=tmp_path,
    )
    outboxer = venv / "bin" / "outboxer"
    home = tmp_path / "home"  # a working directory with no checkout in it
    home.mkdir()
    assert "relay" in run(outboxer, "--help", cwd=home)
    assert "dead letter" in run(outboxer, "demo", cwd=home)
    # A database whose driver this install lacks: one line naming the extra (review 7: it
    # said "No module named 'pymysql'" and no more), exit 3.
    no_driver = subprocess.run(
        [outboxer, "status"],
        cwd=home,
        env={**os.environ, "OUTBOXER_DB": "mysql+pymysql://app@127.0.0.1:1/app"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert no_driver.returncode == 3, no_driver.stderr
    assert "pip install 'outboxer[mysql]'" in no_driver.stderr, no_driver.stderr
    assert "Traceback" not in no_driver.stderr, no_driver.stderr

    url = server.create_database("outboxer_wheel")
    try:
        # Credentials through the environment, as the docs tell users to pass them.
        upgraded = run(outboxer, "db", "upgrade", cwd=home, env={"OUTBOXER_DB": url})
        assert "upgraded from empty to" in upgraded
        where = run(
            python, "-c", "import outboxer.schema as s; print(s.migrations_dir())", cwd=home
        )
        assert Path(where.strip()).is_relative_to(venv)
        engine = create_engine(url)
        try:
            tables = set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
        assert {"outboxer_outbox", "outboxer_inbox", "outboxer_dead_letter"} <= tables
    finally:
        server.drop_database(url)


def test_the_long_running_commands_start_without_importing_alembic(tmp_path: Path) -> None:
    """Before (2026-11-30): every ``outboxer`` and ``outboxer-inbox`` process imported
    Alembic (and Mako, Pygments) at start-up, for the revision list in ``db upgrade
    --help``: about 0.2 s of each start, and of each relay or consumer a test, a deploy or
    a restart loop spawns. Only the ``db`` commands need it."""
    script = (
        "import sys\n"
        "from outboxer.cli import main\n"
        "from outboxer.cli.inbox import main as inbox_main\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    assert run(sys.executable, "-c", script, cwd=tmp_path).strip() == "[]"
