"""The service's test set-up: outboxer's fixtures, and a fresh SQLite database per run."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

import outboxer

pytest_plugins = ["outboxer.testing"]

# Before orders_api is imported: its engine reads ORDERS_DB.
_DB_PATH = Path(tempfile.mkdtemp(prefix="orders-api-")) / "orders.sqlite"
os.environ.setdefault("ORDERS_DB", f"sqlite+aiosqlite:///{_DB_PATH}")


@pytest.fixture
def sync_engine() -> Iterator[Engine]:
    """A sync engine on the service's database (the relay is synchronous), with fresh tables."""
    from orders_api.db import DATABASE_URL, Base

    engine = create_engine(DATABASE_URL.replace("+aiosqlite", ""))
    outboxer.create_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    outboxer.drop_all(engine)
    engine.dispose()
