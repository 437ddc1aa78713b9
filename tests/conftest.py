"""Shared fixtures: real PostgreSQL, MariaDB and SQLite databases, cleaned between tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .models import Base
from .services import SERVERS, require

# Broker fixtures (rabbitmq_case, sqs_case, the moto server...) live beside their cases,
# relay targets in tests.relaying; outboxer.testing is the plugin applications use
# (docs/testing.md).
pytest_plugins = [
    "tests.broker_rabbitmq",
    "tests.broker_sqs",
    "tests.relaying",
    "outboxer.testing",
    "tests.consumer_line",
]

DATABASES = ["postgresql", "mariadb", "sqlite"]


@pytest.fixture(autouse=True)
def _keep_pytests_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in this process (CliRunner) would freeze the heap of pytest itself:
    outboxer.cli.heap.settle is for outboxer's own processes (tests/test_cli_heap.py runs
    it for real, and in the commands run as processes)."""
    monkeypatch.setattr("outboxer.cli.heap.settle", lambda: None)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file with outboxer's tables (for commands run as processes)."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def database_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One database per kind for the whole run, created lazily; dropped at the end."""
    created: dict[str, str] = {}
    yield created
    for kind, url in created.items():
        if kind in SERVERS:
            SERVERS[kind].drop_database(url)


def _database_url(kind: str, urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    if kind not in urls:
        if kind == "sqlite":
            urls[kind] = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'outboxer.sqlite'}"
        else:
            server = SERVERS[kind]
            require(kind, server.available, server.admin_url)
            urls[kind] = server.create_database()
        engine = create_engine(urls[kind])
        outboxer.create_all(engine)
        Base.metadata.create_all(engine)
        engine.dispose()
    return urls[kind]


def clean(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in (*reversed(Base.metadata.sorted_tables), *outboxer.metadata.sorted_tables):
            conn.execute(delete(table))


@pytest.fixture(params=DATABASES)
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(
    db_kind: str, database_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> str:
    return _database_url(db_kind, database_urls, tmp_path_factory)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database holding the outboxer tables and the test models, empty."""
    engine = create_engine(db_url)
    clean(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def Session(engine: Engine) -> sessionmaker[outboxer.OutboxSession]:
    return sessionmaker(engine, class_=outboxer.OutboxSession)


@pytest.fixture
def empty_db_url(db_kind: str, tmp_path: Path) -> Iterator[str]:
    """A brand-new empty database of the current kind (for migration tests)."""
    if db_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite'}"
        return
    server = SERVERS[db_kind]
    require(db_kind, server.available, server.admin_url)
    url = server.create_database("outboxer_m")
    try:
        yield url
    finally:
        server.drop_database(url)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database without outboxer's tables (for the command line)."""
    server = SERVERS["postgresql"]
    require("postgresql", server.available, server.admin_url)
    url = server.create_database("outboxer_cli")
    yield url
    server.drop_database(url)
