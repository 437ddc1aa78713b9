"""The relay when its database stalls or drops a connection at the phases the earlier
fault tests did not reach: while pruning sent rows (retention), while a claim hangs and
SIGTERM arrives, and while the start-up check waits on a database that never answers.

Faults go through tests/faultproxy.py, in front of the real servers.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

import outboxer
from outboxer.relay import database as relay_database
from outboxer.testing import MemoryBroker, MemoryTransport

from .faultproxy import FaultProxy
from .relaying import SessionFactory, output, start_relay
from .services import RABBITMQ_URL, port_open, require
from .test_relay_faults import Running, publish_numbered, wait_until

DEFAULT_PORTS = {"postgresql": 5432, "mariadb": 3306}


@pytest.fixture
def proxied(db_kind: str, db_url: str, engine: Engine) -> Iterator[tuple[FaultProxy, Engine]]:
    """A fault proxy in front of the test database, and a relay engine through it."""
    with FaultProxy.to(db_url, DEFAULT_PORTS[db_kind]) as proxy:
        relay_db = outboxer.relay_engine(proxy.url(db_url), network_timeout=5)
        try:
            yield proxy, relay_db
        finally:
            proxy.heal()
            relay_db.dispose()


def _loud_tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.levelname}: {r.getMessage()}" for r in records if r.exc_info and r.levelno > 10]


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_a_connection_cut_while_pruning_sent_rows_is_one_line_and_the_relay_goes_on(
    proxied: tuple[FaultProxy, Engine],
    Session: SessionFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database restarts just as an idle relay prunes the rows kept for retention:
    one warning line (the traceback at debug level, as for every other outage), and the
    relay sends the next message."""
    proxy, relay_db = proxied
    cuts = {"left": 1}

    def cut(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if cuts["left"] and statement.lstrip().upper().startswith("DELETE FROM OUTBOXER_SENT"):
            cuts["left"] -= 1
            proxy.cut()

    event.listen(relay_db, "before_cursor_execute", cut)
    broker = MemoryBroker()
    relay = outboxer.Relay(
        relay_db,
        MemoryTransport(broker),
        retention=0,
        prune_interval=0.05,
        poll_interval=0.05,
        listen=False,
    )
    caplog.set_level(logging.DEBUG, logger="outboxer")
    r = Running(relay)
    try:
        publish_numbered(Session, "orders", 1, key=None)
        wait_until(lambda: cuts["left"] == 0, 30, "the prune to be cut")
        publish_numbered(Session, "orders", 1, key=None, start=1)
        wait_until(lambda: len(broker.published) >= 2, 30, "the next message")
    finally:
        r.stop(timeout=30)
    assert not _loud_tracebacks(caplog.records)
    assert any("prun" in x.getMessage() for x in caplog.records if x.levelno == logging.WARNING)


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_a_relay_whose_claim_hangs_on_a_stalled_database_still_stops(
    proxied: tuple[FaultProxy, Engine],
    Session: SessionFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database stops answering (a server hung on its disk, a lock, a pooler waiting
    for its server) in the middle of a claim, and SIGTERM comes: the relay gives up on the
    database after its stop grace, instead of hanging until the database answers."""
    monkeypatch.setattr(relay_database, "STOP_GRACE", 2.0)
    proxy, relay_db = proxied
    stalled = threading.Event()

    def stall(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not stalled.is_set() and "outboxer_outbox" in statement and stalled_armed.is_set():
            proxy.stall()  # nothing is lost: the bytes wait until heal()
            stalled.set()

    stalled_armed = threading.Event()
    event.listen(relay_db, "before_cursor_execute", stall)
    broker = MemoryBroker()
    relay = outboxer.Relay(relay_db, MemoryTransport(broker), poll_interval=0.05, listen=False)
    r = Running(relay)
    try:
        publish_numbered(Session, "orders", 1, key=None)
        wait_until(lambda: len(broker.published) == 1, 30, "the first message")
        stalled_armed.set()
        wait_until(stalled.is_set, 30, "a claim to stall")
        took = r.stop(timeout=20)  # asserts it stopped, and with no error
        assert took < 15, took
    finally:
        proxy.heal()
        r.thread.join(timeout=30)


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_sigterm_during_the_start_up_check_on_a_silent_database_exits_at_once(
    proxied: tuple[FaultProxy, Engine], db_url: str
) -> None:
    """``outboxer relay`` started while its database accepts connections but answers
    nothing (a hung server, a pooler queueing the client): SIGTERM must end it (exit 0),
    not wait on the database's silence."""
    require("RabbitMQ", port_open("127.0.0.1", 5672), "start: rabbitmq-server -detached")
    proxy, _ = proxied
    proxy.blackhole()
    relay = start_relay(proxy.url(db_url), RABBITMQ_URL)
    try:
        wait_until(lambda: "checking both" in output(relay), 30, "the relay to start checking")
        wait_until(lambda: proxy.stats.connections >= 1, 30, "the check to connect")
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit on SIGTERM:\n{output(relay)[-2000:]}") from None
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    log = output(relay)
    assert relay.returncode == 0, log
    assert "Traceback" not in log, log
