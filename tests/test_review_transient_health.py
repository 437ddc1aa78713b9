"""The readiness probe while the database accepts connections but answers nothing (a server
hung on its disk, a pooler queueing its clients): /ready must answer 503 in a probe's time,
every time, and /live must not be held up; not hang each request (and every request
queued behind it) until the database answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

import outboxer
from outboxer.cli import health
from outboxer.cli.health import HealthServer
from outboxer.cli.readiness import database_check

from .faultproxy import FaultProxy
from .test_cli_health import get


@pytest.fixture
def silent_database(db_url: str, engine: Engine) -> Iterator[Engine]:
    with FaultProxy.to(db_url, 5432) as proxy:
        proxy.blackhole()
        relay_db = outboxer.relay_engine(proxy.url(db_url))
        try:
            yield relay_db
        finally:
            proxy.heal()
            relay_db.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_ready_answers_503_in_time_while_the_database_is_silent(
    silent_database: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "READY_TIMEOUT", 1.0, raising=False)
    monkeypatch.setattr(health, "READY_CACHE_SECONDS", 0.0)
    server = HealthServer(
        ("127.0.0.1", 0),
        liveness=lambda: 0.0,
        liveness_timeout=10.0,
        checks=[database_check(silent_database, db_url)],
    ).start()
    try:
        for _ in range(3):  # each probe, not only the first, answers
            started = time.monotonic()
            status, body = get(server.port, "/ready")  # a 5 s client timeout
            assert status == 503, (status, body)
            assert "did not answer" in json.loads(body)["problem"]
            assert time.monotonic() - started < 4
        assert get(server.port, "/live")[0] == 200
    finally:
        server.close()
