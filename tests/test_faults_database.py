"""PostgreSQL restarted under a running relay: nothing is lost.

(Under a running consumer: tests/test_faults_consumer.py.)

These restart the shared test server; engines of other tests reconnect (pool pre-ping).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire

from .relaying import (
    Target,
    outbox_count,
    publish_sequence,
    start_relay,
    stop,
    wait_for,
)
from .services import IN_CI, RABBITMQ_URL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.disruptive,
    pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True),
]


def restart_postgresql() -> None:
    version = (
        sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None
    )
    if version is None:
        if IN_CI:
            pytest.fail("cannot restart PostgreSQL: /etc/postgresql is missing")
        pytest.skip("not a Debian PostgreSQL cluster: cannot restart it from a test")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def reachable(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(select(1))
        return True
    except Exception:
        return False


def test_a_database_restart_mid_drain_loses_nothing_and_the_relay_carries_on(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession], db_url: str, rabbit: Target
) -> None:
    total = 20_000
    publish_sequence(Session, rabbit.destination, total=total, keys=30)
    relay = start_relay(db_url, RABBITMQ_URL, "--batch-size", "100", "--lease", "5")
    try:
        wait_for(lambda: outbox_count(engine) < total - 500, 60, "the relay to start sending")
        restart_postgresql()
        wait_for(lambda: reachable(engine), 60, "PostgreSQL to come back")
        wait_for(lambda: outbox_count(engine) == 0, 180, "the outbox to drain after the restart")
    finally:
        log = stop(relay)
    assert "database trouble" in log, "the relay should have seen the restart"
    got = rabbit.collect(total, timeout=120)
    ids = Counter(d.headers[wire.MESSAGE_ID] for d in got)
    assert len(ids) == total, f"{total - len(ids)} messages lost"
    print(f"\ndatabase restart: {total} messages, 0 lost, {sum(ids.values()) - total} duplicates")
