"""Finding the real services the tests use; skip on a laptop without them, fail in CI."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from functools import cache

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

PG_SERVER = os.environ.get("OUTBOXER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_SERVER = os.environ.get("OUTBOXER_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
RABBITMQ_URL = os.environ.get("OUTBOXER_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(service: str, available: bool, how: str = "") -> None:
    """Skip when ``service`` is missing, or fail under CI=true (a missing service is a bug)."""
    if available:
        return
    message = f"{service} is not reachable{': ' + how if how else ''}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: service-backed tests must not skip)")
    pytest.skip(message)


@dataclass
class Server:
    """A database server on which the tests create throwaway databases."""

    kind: str  # postgresql | mariadb
    admin_url: str

    @property
    def available(self) -> bool:
        url = make_url(self.admin_url)
        return port_open(url.host or "127.0.0.1", url.port or 0)

    def create_database(self, prefix: str = "outboxer_t") -> str:
        """Create an empty database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        admin = _admin_engine(self.admin_url)
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        admin = _admin_engine(self.admin_url)
        with admin.connect() as conn:
            if self.kind == "postgresql":
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))


@cache
def _admin_engine(url: str) -> Engine:
    # pre-ping: a fault test restarts the server under the session's pooled connections.
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1, pool_pre_ping=True)


SERVERS = {
    "postgresql": Server("postgresql", PG_SERVER),
    "mariadb": Server("mariadb", MARIADB_SERVER),
}


def async_url(url: str) -> str:
    """The asyncio driver's URL for a sync test database URL."""
    parsed = make_url(url)
    driver = {
        "postgresql": "postgresql+psycopg",
        "mysql": "mysql+asyncmy",
        "sqlite": "sqlite+aiosqlite",
    }[parsed.get_backend_name()]
    return parsed.set(drivername=driver).render_as_string(hide_password=False)
