"""Review 7, a new user's first deployment: what the commands said to the mistakes a
newcomer makes (a Heroku-style ``postgres://`` URL, a driver not installed, tables dropped
behind the migrations' back) and what ``dead-letter show`` printed on an 80-column pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import schema
from outboxer.cli.common import import_target
from outboxer.testing import MessageRejected, Published, drain, drain_async

from .test_cli_failures import one_error_line, outboxer_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["status"], ["db", "upgrade"], ["dead-letter", "list"]])
@pytest.mark.parametrize("scheme", ["postgres", "postgres+psycopg", "nosuchdb"])
def test_an_unknown_dialect_is_one_line_naming_the_fix(command: list[str], scheme: str) -> None:
    """``postgres://`` (Heroku's, many PaaS' DATABASE_URL) is no SQLAlchemy dialect: every
    command printed a NoSuchModuleError traceback and exited 1."""
    result = outboxer_cli(*command, env={"OUTBOXER_DB": f"{scheme}://app:s3cret@db/app"})
    assert result.returncode == 3, result.stdout + result.stderr
    line = one_error_line(result)
    assert "s3cret" not in line
    assert f"'{scheme}'" in line, line
    if scheme.startswith("postgres"):
        assert "postgresql+psycopg://" in line, line


@pytest.mark.parametrize(
    ("url", "module", "fix"),
    [
        ("postgresql+psycopg://app@db/app", "psycopg", "pip install 'outboxer[postgresql]'"),
        ("postgresql+asyncpg://app@db/app", "psycopg", "pip install 'outboxer[postgresql]'"),
        ("mysql+pymysql://app@db/app", "pymysql", "pip install 'outboxer[mysql]'"),
        ("mysql://app@db/app", "MySQLdb", "mysql+pymysql://"),
        ("postgresql+psycopg2://app@db/app", "psycopg2", "postgresql+psycopg://"),
    ],
)
def test_a_driver_that_is_not_installed_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, fix: str
) -> None:
    """A clean ``pip install outboxer`` has no database driver: ``outboxer db upgrade``
    said "No module named 'psycopg'" and no more (the broker's says which extra)."""
    monkeypatch.setitem(sys.modules, module, None)  # as on an install without it
    result = outboxer_cli("status", env={"OUTBOXER_DB": url})
    assert result.returncode == 3, result.stdout + result.stderr
    line = one_error_line(result)
    assert fix in line, line


@pytest.fixture
def dropped_url(tmp_path: Path) -> str:
    """A database migrated by ``outboxer db upgrade`` whose tables were then dropped behind
    the migrations' back (a DBA, a script dropping ``outboxer.metadata``), the version table
    left."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    schema.upgrade(engine)
    outboxer.metadata.drop_all(engine)
    engine.dispose()
    return url


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_drop_all_drops_the_record_of_the_migrations_too(empty_db_url: str) -> None:
    """``outboxer.drop_all`` (docs/testing.md's fixture calls it) left
    ``outboxer_alembic_version`` behind: the next ``outboxer db upgrade`` said the
    database was at the latest revision and made no table."""
    engine = create_engine(empty_db_url)
    try:
        schema.upgrade(engine)
        outboxer.drop_all(engine)
        assert schema.current(engine) is None
        upgrade = outboxer_cli("db", "upgrade", env={"OUTBOXER_DB": empty_db_url})
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert schema.current(engine) == schema.head()
        assert schema.tables_present(engine)
    finally:
        engine.dispose()


def test_tables_dropped_behind_the_migrations_are_not_up_to_date(dropped_url: str) -> None:
    """The processes said "the outboxer tables are missing: run outboxer db upgrade",
    `db upgrade` said "already at revision 0006" and did nothing, and `db current` said
    "up to date": an operator going round in circles."""
    status = outboxer_cli("status", env={"OUTBOXER_DB": dropped_url})
    assert status.returncode == 6
    current = outboxer_cli("db", "current", env={"OUTBOXER_DB": dropped_url})
    assert current.returncode == 0, current.stderr
    assert "up to date" not in current.stdout, current.stdout
    assert "outboxer_alembic_version" in current.stdout, current.stdout
    upgrade = outboxer_cli("db", "upgrade", env={"OUTBOXER_DB": dropped_url})
    assert upgrade.returncode == 1, upgrade.stdout + upgrade.stderr
    line = one_error_line(upgrade)
    assert "missing" in line and "outboxer_alembic_version" in line, line


def test_dead_letter_show_wraps_the_traceback_and_payload_instead_of_cutting_them(
    tmp_path: Path,
) -> None:
    """Piped (or on a terminal narrower than the lines), ``dead-letter show`` cut each
    traceback line and the payload's long strings at the panel's edge: the file names and
    line numbers of the traceback were lost."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    schema.upgrade(engine)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    consumer = outboxer.Consumer(Session, name="billing", retry=outboxer.Retry(max_attempts=1))
    deep = "a_handler_module_name_long_enough_to_pass_the_edge_of_an_eighty_column_panel"

    @consumer.handler("review7.failing", destination="review7")
    def charge(event: dict[str, str]) -> None:
        raise ValueError(f"declined {deep}_END_OF_ERROR")

    with Session.begin() as session:
        session.publish(
            {"note": "x" * 150 + "END_OF_PAYLOAD"}, type="review7.failing", destination="review7"
        )
    drain(engine, [consumer], fail_fast=False)
    engine.dispose()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("outboxer")), "dead-letter", "show", "1"],
        env={**os.environ, "OUTBOXER_DB": url, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The panels' lines joined without spaces: what was folded reads whole again.
    shown = "".join(line.strip("│") for line in result.stdout.splitlines()).replace(" ", "")
    assert "END_OF_PAYLOAD" in shown, result.stdout
    assert f"{deep}_END_OF_ERROR" in shown, result.stdout
    assert 'test_review7_newuser.py",line' in shown, result.stdout  # the frame's line number


def test_the_testing_page_runs_as_its_reader_runs_it(tmp_path: Path) -> None:
    """docs/testing.md's application and tests, written where the page says and run with
    the page's own command, without the PYTHONPATH the docs' harness sets: `pytest -q
    tests` put tests/ (the conftest's directory), not the project, on sys.path, and every
    test failed to import myapp."""
    page = (ROOT / "docs" / "testing.md").read_text()
    for name, code in re.findall(r'```python title="([^"]+)"\n(.*?)```', page, re.S):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code)
    commands = [
        block.strip() for block in re.findall(r"```bash\n(.*?)```", page, re.S) if "pytest" in block
    ]
    assert len(commands) == 1, commands
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATABASE_URL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-c", commands[0]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 passed" in result.stdout, result.stdout


def test_the_shop_readme_starts_its_consumer_on_a_fresh_database(tmp_path: Path) -> None:
    """examples/README.md "With Docker", in its order, on a database with nothing in it
    (what the compose file starts): its first command, ``outboxer-inbox shop.app:billing``,
    exited 6 (the outboxer tables are missing), since only ``python -m shop.place_orders``,
    a step later, created them (and with outboxer.create_all, which ``outboxer db upgrade``
    then refuses). Here on SQLite and the in-process broker: the steps up to the consumer's
    start, the consumer run with --once instead of in the background."""
    page = (ROOT / "examples" / "README.md").read_text()
    block = re.search(r"## With Docker\n\n```sh\n(.*?)```", page, re.S)
    assert block is not None
    steps: list[str] = []
    for line in block.group(1).splitlines():
        command = line.split("#", 1)[0].strip()
        if not command or command.startswith(("docker ", "pip ", "export OTEL")):
            continue
        if command.startswith("cd "):
            continue  # the test runs in examples/ itself
        if command.startswith("OTEL_SERVICE_NAME="):
            command = command.partition(" ")[2]
        if command.startswith("outboxer-inbox"):
            steps.append(command.rstrip("& ") + " --once")
            break
        steps.append(command)
    assert steps and steps[-1].startswith("outboxer-inbox"), steps
    url = f"sqlite:///{tmp_path / 'shop.sqlite'}"
    script = "set -e\n" + "\n".join(steps)
    # The page's exports name the compose file's services: after each, point them here.
    script = "\n".join(
        f"{line}\nexport SHOP_DB={url} OUTBOXER_DB={url} OUTBOXER_BROKER=memory://"
        if line.startswith("export")
        else line
        for line in script.splitlines()
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOXER_", "SHOP_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT / "examples")
    env["SHOP_DB"] = env["OUTBOXER_DB"] = url
    env["OUTBOXER_BROKER"] = "memory://"
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT / "examples",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{script}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "consumer shop-billing started" in result.stderr, result.stderr


def test_retention_is_the_tables_as_operations_md_says(tmp_path: Path) -> None:
    """docs/operations.md said the inbox grows "until `outboxer inbox prune` removes old rows
    (run it daily)"; a running consumer prunes by itself, and its windows apply to its own
    rows (docs/operations.md, Sizing, and docs/consumers.md, Retention;
    tests/test_retention_scope.py on the three databases)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
    outboxer.create_all(engine)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    audit = outboxer.Consumer(Session, name="audit", inbox_retention=30 * 86400)
    cache = outboxer.Consumer(Session, name="cache", inbox_retention=0.5, dead_letter_retention=0.5)

    @audit.handler("review7.seen", destination="review7")
    def seen(event: dict[str, str]) -> None: ...

    @audit.handler("review7.bad", destination="review7", retry=outboxer.Retry(max_attempts=1))
    def bad(event: dict[str, str]) -> None:
        raise ValueError("no")

    @cache.handler("review7.seen", destination="review7")
    def cached(event: dict[str, str]) -> None: ...

    with Session.begin() as session:
        session.publish({}, type="review7.seen", destination="review7")
        session.publish({}, type="review7.bad", destination="review7")
    drain(engine, [audit, cache], fail_fast=False)
    assert audit.prune() == (0, 0)  # nothing is 30 days old
    time.sleep(1.1)
    assert cache.prune() == (1, 0)  # its own inbox row; audit's row and dead letter stay
    assert audit.prune() == (0, 0)
    engine.dispose()


@outboxer.message("review7.placed", destination="review7-orders")
@dataclass
class Placed:
    order_id: int


@pytest.fixture
def drained_app(tmp_path: Path) -> tuple[Engine, sessionmaker[outboxer.OutboxSession]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
    outboxer.create_all(engine)
    return engine, sessionmaker(engine, class_=outboxer.OutboxSession)


def test_drain_fails_the_test_on_a_message_the_consumer_cannot_read(
    drained_app: tuple[Engine, sessionmaker[outboxer.OutboxSession]],
) -> None:
    """docs/testing.md: drain raises in the test "instead of a retry or a dead letter that
    nobody looks at". A message whose payload does not match its type (the publisher and
    the consumer disagree on the schema: what a test is for) became a dead letter, and
    drain returned as if all was well (errors=[])."""
    engine, Session = drained_app
    consumer = outboxer.Consumer(Session, name="review7-billing")
    seen: list[int] = []

    @consumer.handler(Placed)
    def charge(event: Placed) -> None:
        seen.append(event.order_id)

    with Session.begin() as session:
        session.publish({"order_id": "seven"}, type="review7.placed", destination="review7-orders")
    with pytest.raises(MessageRejected, match="payload_mismatch") as caught:
        drain(engine, [consumer])
    assert "review7-billing" in str(caught.value) and "order_id" in str(caught.value)
    assert seen == []
    # fail_fast=False: the dead letter, as before, for tests that look at it themselves
    with Session.begin() as session:
        session.publish({"order_id": "eight"}, type="review7.placed", destination="review7-orders")
    report = drain(engine, [consumer], fail_fast=False)
    assert report.messages == 1
    assert [d.error_type for d in outboxer.DeadLetters(Session).list()] == [
        "payload_mismatch",
        "payload_mismatch",
    ]


def test_drain_takes_one_consumer_as_well_as_a_list(
    drained_app: tuple[Engine, sessionmaker[outboxer.OutboxSession]],
) -> None:
    """``drain(engine, billing)``, the natural first try, was TypeError: 'Consumer' object
    is not iterable."""
    engine, Session = drained_app
    consumer = outboxer.Consumer(Session, name="review7-single")
    seen: list[int] = []

    @consumer.handler(Placed)
    def charge(event: Placed) -> None:
        seen.append(event.order_id)

    with Session.begin() as session:
        session.publish(Placed(order_id=1))
    assert drain(engine, consumer).messages == 1
    assert seen == [1]


@outboxer.message("review7.priced", destination="review7-orders", key="order_id")
@dataclass
class Priced:
    order_id: int
    amount: int


def test_assert_published_says_what_was_published_and_what_was_asked(
    drained_app: tuple[Engine, sessionmaker[outboxer.OutboxSession]],
) -> None:
    """A failed ``assert_published`` listed only the type names published, and left out
    the key it was asked for: "no review7.priced was published; published:
    ['review7.priced', 'review7.priced']" when two were, with other keys. A key given as an
    int (the key field's type) never matched, and a field name the type lacks matched a
    missing value instead of failing."""
    _engine, Session = drained_app
    with Published() as published, Session.begin() as session:
        session.publish(Priced(order_id=1, amount=10))
        session.publish(Priced(order_id=2, amount=20))
    with pytest.raises(AssertionError) as caught:
        published.assert_published(Priced, key="3")
    assert "key='3'" in str(caught.value) and "amount=20" in str(caught.value), caught.value
    with pytest.raises(AssertionError) as caught:
        published.assert_published(Priced, amount=30)
    assert "amount=10" in str(caught.value) and "amount=20" in str(caught.value), caught.value
    assert len(published.assert_published(Priced, key=2, amount=20)) == 1  # an int key
    with pytest.raises(AssertionError, match="no field 'amout'"):
        published.assert_published(Priced, amout=None)  # a typo must not pass


def test_a_published_that_never_recorded_says_so(
    drained_app: tuple[Engine, sessionmaker[outboxer.OutboxSession]],
) -> None:
    """``Published()`` without ``with`` (or start()) records nothing, and its asserts said
    "expected one Priced to be published, got 0", as if the code under test published
    nothing."""
    _engine, Session = drained_app
    published = Published()
    with Session.begin() as session:
        session.publish(Priced(order_id=1, amount=10))
    with pytest.raises(AssertionError, match="never recorded"):
        published.one(Priced)
    with pytest.raises(AssertionError, match="never recorded"):
        published.assert_published(Priced)


def test_every_list_of_extras_in_the_readme_is_complete() -> None:
    """The quick start's "# extras: ..." left out asyncio, which AsyncOutboxSession and
    async consumers need (the Installing section listed it)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    ) - {"test", "dev"}
    lists = re.findall(r"# extras: ([a-z, ]+)", (ROOT / "README.md").read_text())
    assert lists
    for listed in lists:
        assert {e.strip() for e in listed.split(",")} == declared, listed


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("OUTBOXER_RELAY_HEALTHPORT", "OUTBOXER_RELAY_HEALTH_PORT"),  # a typo
        ("OUTBOXER_BATCH_SIZE", "OUTBOXER_RELAY_BATCH_SIZE"),  # unscoped, as before review 4
    ],
)
def test_a_variable_no_command_reads_is_a_warning_naming_the_right_one(
    tmp_path: Path, variable: str, hint: str
) -> None:
    """A misspelt or unscoped variable was silently ignored: OUTBOXER_RELAY_HEALTHPORT=8080
    started a relay with no health server (the probes then fail, and nothing says why);
    OUTBOXER_BATCH_SIZE, the name releases before the scoped variables read, changed
    nothing after an upgrade."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    engine.dispose()
    env = {"OUTBOXER_DB": url, variable: "500", "OUTBOXER_TRACING": "off"}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("outboxer")), "relay", "--once"],
        env={**os.environ, **env, "OUTBOXER_BROKER": "memory://?discard=true"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if variable in line]
    assert len(warnings) == 1, result.stderr
    assert "WARNING" in warnings[0] and hint in warnings[0], warnings[0]
    # Known variables, and the library's own (OUTBOXER_TRACING), are no warning.
    assert "OUTBOXER_TRACING" not in result.stderr and "OUTBOXER_DB" not in result.stderr


def test_a_module_named_like_a_standard_one_is_named_as_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``outboxer-inbox sched:reports`` with the application's ``sched.py`` in the working
    directory imported the standard library's sched (the working directory goes last on
    sys.path, on purpose) and said "module 'sched' has no attribute 'reports'": true, and
    no help. The message names the file imported and the one beside it."""
    (tmp_path / "sched.py").write_text("reports = None\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(click.BadParameter) as caught:
        import_target("sched:reports", "CONSUMER", "myapp.consumers:billing")
    message = caught.value.message
    assert "sched.py" in message and "rename" in message, message
    assert str(tmp_path / "sched.py") in message or "./sched.py" in message, message


def test_an_application_whose_driver_is_not_installed_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``outboxer-inbox myapp:billing`` where myapp creates its engine at import, on an
    install without the driver: "cannot import 'myapp' ...: ModuleNotFoundError: No module
    named 'psycopg'", without the extra that installs it (the CLI's own engines say it)."""
    (tmp_path / "review7_driverless.py").write_text(
        "from sqlalchemy import create_engine\n"
        "engine = create_engine('postgresql+psycopg://app@db/app')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(click.BadParameter) as caught:
        import_target("review7_driverless:billing", "CONSUMER", "myapp.consumers:billing")
    assert "pip install 'outboxer[postgresql]'" in caught.value.message, caught.value.message


async def test_drain_async_given_the_async_engine_says_which_engine_to_pass(
    tmp_path: Path,
) -> None:
    """``drain_async(async_engine, ...)``, the engine an async application has at hand,
    said "Relay needs a SQLAlchemy Engine (outboxer.relay_engine(url)), got AsyncEngine",
    which names neither drain nor the fix."""
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.sqlite'}")
    try:
        with pytest.raises(TypeError, match=r"create_engine\(url\)"):
            await drain_async(async_engine, [])  # type: ignore[arg-type]
    finally:
        await async_engine.dispose()


def test_an_on_failure_function_of_the_wrong_shape_is_a_usage_error_naming_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``outboxer relay --on-failure myapp.alerts:page`` with a function outboxer cannot call
    exited 3 saying "Relay(on_failure=...) is called as ...; 'page' cannot be": the
    Python API's words, after the database engine was made; the flag is what to fix."""
    (tmp_path / "review7_alerts.py").write_text("def page() -> None: ...\n")
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    result = outboxer_cli(
        "relay",
        "--once",
        "--on-failure",
        "review7_alerts:page",
        env={"OUTBOXER_DB": url, "OUTBOXER_BROKER": "memory://?discard=true"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--on-failure" in result.stderr and "on_failure(failure)" in result.stderr
