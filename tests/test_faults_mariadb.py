"""Faults on MariaDB under a running relay and a running (batching) consumer: the server
restarted, connections killed, the server made read-only. Nothing is lost, each handler
effect happens once, per-key order holds, and the processes carry on without a traceback.

Everything here runs on a private MariaDB server (chaos.private.PrivateMariaDB: its own
data directory, port and socket), never on the shared one: restarting it disturbs nobody,
so these tests are not ``disruptive``. They skip on a machine without MariaDB's server
programs, and fail under CI=true.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pymysql
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from chaos.private import PrivateMariaDB, Unavailable, private_mariadb
from outboxer import wire
from outboxer.testing import MemoryBroker, MemoryTransport

from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .faultproxy import DOWN, UP, FaultProxy
from .models import Base, Effect, OrderPlaced
from .relaying import (
    Target,
    publish_sequence,
    spawn,
    start_relay,
    stop,
    wait_for,
)
from .services import RABBITMQ_URL, port_open, require
from .test_consumer_brokers import Line

SessionFactory = sessionmaker[outboxer.OutboxSession]


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateMariaDB]:
    try:
        with private_mariadb() as started:
            yield started
    except Unavailable as exc:
        require("a private MariaDB server", False, str(exc))


@dataclass
class Database:
    url: str
    engine: Engine
    Session: SessionFactory


@pytest.fixture
def db(server: PrivateMariaDB) -> Iterator[Database]:
    """A fresh database on the private server, with outboxer's tables and the models'."""
    name = f"outboxer_f_{len(server.databases)}"
    server.databases.append(name)
    server.execute(f"CREATE DATABASE {name}")
    url = server.server.rsplit("/", 1)[0] + f"/{name}"
    engine = create_engine(url, pool_pre_ping=True)
    outboxer.create_all(engine)
    Base.metadata.create_all(engine)
    try:
        yield Database(url, engine, sessionmaker(engine, class_=outboxer.OutboxSession))
    finally:
        engine.dispose()


def count(engine: Engine, table: str) -> int:
    """Rows in ``table``, or -1 while the server cannot be reached."""
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
    except Exception:
        return -1


def pending_below(engine: Engine, rows: int) -> bool:
    return 0 <= count(engine, "outboxer_outbox") < rows


def first_deliveries(values: list[int]) -> list[int]:
    """Each value at its first appearance (duplicates are allowed; reordering is not)."""
    seen: set[int] = set()
    firsts = []
    for value in values:
        if value not in seen:
            seen.add(value)
            firsts.append(value)
    return firsts


def crash_or_restart(server: PrivateMariaDB, *, crash: bool) -> None:
    """A clean restart (SIGTERM: connections killed, statements in progress fail), or a
    crash (SIGKILL), 2 s down (refused connections, the processes back off), then InnoDB's
    recovery at the start."""
    if crash:
        server.kill()
        time.sleep(2)  # the outage itself, not a wait for something
        server.start_again()
    else:
        server.restart()


def no_traceback(log: str, who: str) -> None:
    assert "Traceback" not in log, f"{who} logged a traceback:\n{log[-6000:]}"


# The relay ----------------------------------------------------------------------------------


def test_mariadb_restarted_under_two_relays_loses_nothing_and_keeps_key_order(
    server: PrivateMariaDB, db: Database, rabbit: Target
) -> None:
    total = 3000
    expected = publish_sequence(db.Session, rabbit.destination, total=total, keys=20)
    relays = [
        start_relay(db.url, RABBITMQ_URL, "--batch-size", "100", "--lease", "5", "--name", f"r{i}")
        for i in range(2)  # two at once: a restart must not let one undo the other's order
    ]
    restarts = 0
    try:
        for left in (total - 300, total // 2):  # twice, mid-drain
            wait_for(partial(pending_below, db.engine, left), 30, "the relay to send")
            crash_or_restart(server, crash=restarts == 1)
            restarts += 1
        wait_for(lambda: count(db.engine, "outboxer_outbox") == 0, 60, "the outbox to drain")
    finally:
        logs = [stop(relay) for relay in relays]
    for log in logs:
        assert "database trouble" in log, "each relay should have seen the restarts"
        no_traceback(log, "a relay")
    got = rabbit.collect(total, timeout=60)
    ids = Counter(d.headers[wire.MESSAGE_ID] for d in got)
    assert len(ids) == total, f"{total - len(ids)} messages lost"
    seen: dict[str, list[int]] = {}
    for delivery in got:
        payload = json.loads(delivery.body)
        seen.setdefault(payload["key"], []).append(payload["seq"])
    order = {key: first_deliveries(seqs) for key, seqs in seen.items()}
    assert order == expected, "per-key order after a restart"
    print(f"\nMariaDB restarted {restarts}x under 2 relays: {total} sent, {len(got) - total} again")


# The consumer -------------------------------------------------------------------------------


@pytest.fixture
def line(db: Database) -> Iterator[Line]:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
    case = RabbitMQCase()
    try:
        yield Line(db.engine, db.Session, case)
    finally:
        case.close()


def reserved(line: Line) -> int:
    try:
        return len(line.reservations())
    except Exception:
        return -1


def assert_each_order_reserved_once(line: Line, total: int) -> None:
    per_order = line.reservations()
    assert len(per_order) == total, f"{total - len(per_order)} orders never reserved"
    twice = [order for order, n in per_order.items() if n > 1]
    assert not twice, f"{len(twice)} orders reserved more than once"


def test_mariadb_restarted_under_a_batching_consumer_applies_each_effect_once(
    server: PrivateMariaDB, db: Database, line: Line
) -> None:
    total = 1500
    command, env = line.inbox_process(db.url, RABBITMQ_URL)
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    assert line.send() == total
    # As deployed: a relay beside the consumer (retries go through the outbox).
    relay = start_relay(db.url, RABBITMQ_URL, "--poll-interval", "0.2")
    consumer = spawn(command, env=env)
    handled = False
    try:
        for crash, at in enumerate((200, 700)):
            wait_for(lambda: reserved(line) > at, 30, f"{at} orders handled")  # noqa: B023
            crash_or_restart(server, crash=bool(crash))
        wait_for(lambda: reserved(line) >= total, 60, "every message to be handled")
        handled = True
    finally:
        log = stop(consumer)
        relay_log = stop(relay)
        if not handled:
            print(f"\n--- outboxer-inbox ---\n{log[-8000:]}\n--- relay ---\n{relay_log[-4000:]}")
    assert_each_order_reserved_once(line, total)
    assert not line.dead(), "a restart must not make dead letters"
    no_traceback(log, "the consumer")
    no_traceback(relay_log, "the relay")


# Errors injected at the worst moments (the real driver's exceptions) ----------------------


class Faults:
    """Make chosen statements or commits of ``engine`` fail as MariaDB makes them fail.

    ``on_statement(match, code, message, times)``: the next ``times`` statements containing
    ``match`` raise PyMySQL's OperationalError(code) before they reach the server (a
    deadlock, a lock-wait timeout, ...). ``on_commit(times, applied)``: the next ``times``
    commits lose their connection (2013), after the server applied them (``applied``: the
    outcome is unknown to the client) or before.
    """

    def __init__(self, engine: Engine) -> None:
        self.statements: list[tuple[str, int, str, list[int]]] = []
        self.commits: list[tuple[bool, list[int]]] = []
        self.fired: Counter[str] = Counter()
        event.listen(engine, "before_cursor_execute", self._statement)
        dialect = engine.dialect
        real_commit = dialect.do_commit

        def do_commit(dbapi_connection: Any) -> None:
            for applied, left in self.commits:
                if left[0] > 0:
                    left[0] -= 1
                    if applied:
                        real_commit(dbapi_connection)
                    self.fired["commit"] += 1
                    dbapi_connection._sock.close()  # the connection is gone either way
                    raise pymysql.err.OperationalError(
                        2013, "Lost connection to MySQL server during query"
                    )
            real_commit(dbapi_connection)

        dialect.do_commit = do_commit  # type: ignore[method-assign]

    def on_statement(self, match: str, code: int, message: str, times: int = 1) -> None:
        self.statements.append((match, code, message, [times]))

    def on_commit(self, times: int = 1, *, applied: bool) -> None:
        self.commits.append((applied, [times]))

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        for match, code, message, left in self.statements:
            if left[0] > 0 and match in statement:
                left[0] -= 1
                self.fired[match] += 1
                raise pymysql.err.OperationalError(code, message)


DEADLOCK = (1213, "Deadlock found when trying to get lock; try restarting transaction")
LOCK_WAIT = (1205, "Lock wait timeout exceeded; try restarting transaction")
GONE_AWAY = (2006, "MySQL server has gone away")
LOST = (2013, "Lost connection to MySQL server during query")
SHUTDOWN = (1053, "Server shutdown in progress")
READ_ONLY = (
    1290,
    "The MariaDB server is running with the --read-only option so it cannot execute this statement",
)


@pytest.mark.parametrize(
    ("error", "where"),
    [
        (DEADLOCK, "FOR UPDATE SKIP LOCKED"),
        (LOCK_WAIT, "UPDATE outboxer_outbox SET locked_by"),
        (DEADLOCK, "DELETE FROM outboxer_outbox"),
        (SHUTDOWN, "DELETE FROM outboxer_outbox"),
        (READ_ONLY, "UPDATE outboxer_outbox SET locked_by"),
    ],
    ids=[
        "deadlock-lock",
        "lockwait-lease",
        "deadlock-settle",
        "shutdown-settle",
        "read-only",
    ],
)
def test_relay_on_mariadb_waits_out_each_database_error_and_keeps_key_order(
    db: Database,
    error: tuple[int, str],
    where: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Read the relay's own logger whatever earlier tests in this process did to logging
    # (a command run with CliRunner configures it; a dictConfig disables loggers).
    relay_log = logging.getLogger("outboxer.relay")
    monkeypatch.setattr(relay_log, "disabled", False)
    monkeypatch.setattr(relay_log, "level", logging.WARNING)
    relay_log.addHandler(caplog.handler)
    try:
        _drain_with_faults(db, error, where, caplog)
    finally:
        relay_log.removeHandler(caplog.handler)


def _drain_with_faults(
    db: Database, error: tuple[int, str], where: str, caplog: pytest.LogCaptureFixture
) -> None:
    total, keys = 300, 5
    publish_keyed(db.Session, total, keys)
    engine = outboxer.relay_engine(db.url, network_timeout=5)
    faults = Faults(engine)
    faults.on_statement(where, *error, times=2)
    broker = MemoryBroker()
    relay = outboxer.Relay(engine, MemoryTransport(broker), batch_size=20, poll_interval=0.05)
    with running(relay):
        wait_for(lambda: count(db.engine, "outboxer_outbox") == 0, 20, "the outbox to drain")
    engine.dispose()
    assert faults.fired[where] == 2, "the fault was not injected"
    assert_sent_in_key_order([e.payload for e in broker.published], total, keys)
    assert not outboxer.DeadLetters(db.Session).list()
    trouble = [r for r in caplog.records if "database trouble" in r.getMessage()]
    assert len(trouble) >= 2 and all(r.exc_info is None for r in trouble), "one line each"


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_relay_commits_whose_outcome_is_unknown_lose_nothing_and_keep_key_order(
    db: Database, applied: bool
) -> None:
    """The connection drops on COMMIT: of a claim, of a settle, the relay cannot tell which,
    nor whether the server applied it."""
    total, keys = 300, 5
    publish_keyed(db.Session, total, keys)
    engine = outboxer.relay_engine(db.url, network_timeout=5)
    faults = Faults(engine)
    broker = MemoryBroker()
    relay = outboxer.Relay(
        engine, MemoryTransport(broker), batch_size=20, poll_interval=0.05, lease=2.0
    )
    with running(relay):
        for _ in range(3):
            faults.on_commit(1, applied=applied)
            wait_for(lambda: faults.fired["commit"] >= 1, 10, "a commit to fail")
            faults.fired["commit"] = 0
        wait_for(lambda: count(db.engine, "outboxer_outbox") == 0, 20, "the outbox to drain")
    engine.dispose()
    assert_sent_in_key_order([e.payload for e in broker.published], total, keys)


def publish_keyed(Session: SessionFactory, total: int, keys: int) -> None:
    with Session.begin() as session:
        for n in range(total):
            session.publish({"n": n}, type="test.seq", destination="orders", key=f"k{n % keys}")


def assert_sent_in_key_order(payloads: list[bytes], total: int, keys: int) -> None:
    per_key: dict[int, list[int]] = {}
    for payload in payloads:
        n = json.loads(payload)["n"]
        per_key.setdefault(n % keys, []).append(n)
    firsts = {key: first_deliveries(ns) for key, ns in per_key.items()}
    assert sum(len(ns) for ns in firsts.values()) == total, "messages lost"
    for key, ns in firsts.items():
        assert ns == sorted(ns), f"key k{key} out of order"


@contextmanager
def running(relay: outboxer.Relay) -> Iterator[None]:
    """``relay`` runs in a thread inside the block; it must stop cleanly after it."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        relay.stop()
        thread.join(30)
    assert not thread.is_alive(), "the relay did not stop"
    assert not errors, f"the relay died: {errors[0]!r}"


# The consumer: errors at the inbox insert, in the handler's writes, on COMMIT --------------


def consumer_line(line: Line, db: Database, retry: outboxer.Retry) -> Faults:
    """Give ``line`` a consumer on its own engine, with faults; its handler reserves."""
    engine = create_engine(db.url, pool_pre_ping=True)
    faults = Faults(engine)
    sessions = sessionmaker(engine, class_=outboxer.OutboxSession)
    line.consumer = outboxer.Consumer(sessions, name=line.name, retry=retry)

    @line.handler()
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    line.subscribe()
    return faults


def consume_all(line: Line, total: int) -> None:
    deadline = time.monotonic() + 15
    while reserved(line) + len(line.dead()) < total or line.pending():
        assert time.monotonic() < deadline, f"{reserved(line)}/{total} handled in time"
        line.send()  # retries scheduled through the outbox
        line.consume()


@pytest.mark.parametrize(
    ("error", "where"),
    [
        pytest.param(DEADLOCK, "INSERT IGNORE INTO outboxer_inbox"),
        pytest.param(LOCK_WAIT, "INSERT IGNORE INTO outboxer_inbox"),
        pytest.param(DEADLOCK, "INSERT INTO test_effects"),
        pytest.param(SHUTDOWN, "INSERT IGNORE INTO outboxer_inbox"),
        (GONE_AWAY, "INSERT IGNORE INTO outboxer_inbox"),
        (LOST, "INSERT INTO test_effects"),
    ],
    ids=[
        "deadlock-inbox",
        "lockwait-inbox",
        "deadlock-effect",
        "shutdown-inbox",
        "gone-inbox",
        "lost-effect",
    ],
)
def test_a_transient_mariadb_error_is_no_handler_failure_and_dead_letters_nothing(
    db: Database, line: Line, error: tuple[int, str], where: str
) -> None:
    """A deadlock or a lock-wait timeout says "try restarting transaction": the
    database's trouble, not the handler's. With one attempt allowed (or a ``retry_on``
    that names the application's own errors), a message must not be dead-lettered for it."""
    total = 30  # a batch of 20 (the default), then one of 10
    faults = consumer_line(line, db, outboxer.Retry(max_attempts=1))
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    assert line.send() == total
    faults.on_statement(where, *error, times=4)  # a batch, then messages alone
    consume_all(line, total)
    assert faults.fired[where] == 4, "the fault was not injected"
    assert_each_order_reserved_once(line, total)
    dead = line.dead()
    assert not dead, f"{len(dead)} dead-lettered for {error[1]!r}: {dead[0].error_message!r}"


def test_a_consumer_on_a_database_gone_read_only_for_a_while_dead_letters_nothing(
    db: Database, line: Line
) -> None:
    """Every write refused (1290, a failover's old primary) for the first 8 statements that
    write: the batch, a handler's run, the writes of its outcome. Then writes pass again."""
    total = 30
    faults = consumer_line(line, db, outboxer.Retry(max_attempts=1))
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    assert line.send() == total
    faults.on_statement("INSERT", *READ_ONLY, times=8)
    consume_all(line, total)
    assert faults.fired["INSERT"] == 8, "the fault was not injected"
    assert_each_order_reserved_once(line, total)
    assert not line.dead()


def test_a_dead_letter_whose_write_deadlocks_is_written_whole_not_quarantined(
    db: Database, line: Line
) -> None:
    engine = create_engine(db.url, pool_pre_ping=True)
    faults = Faults(engine)
    sessions = sessionmaker(engine, class_=outboxer.OutboxSession)
    line.consumer = outboxer.Consumer(sessions, name=line.name, retry=outboxer.Retry(1))

    @line.handler()
    def reserve(event: OrderPlaced) -> None:
        raise ValueError(f"order {event.order_id} cannot be reserved")

    line.subscribe()
    line.publish(OrderPlaced(order_id=7))
    assert line.send() == 1
    faults.on_statement("INSERT INTO outboxer_dead_letter", *DEADLOCK)
    deadline = time.monotonic() + 10
    while not line.dead():
        assert time.monotonic() < deadline, "no dead letter"
        line.consume()
    assert faults.fired["INSERT INTO outboxer_dead_letter"] == 1, "the fault was not injected"
    (dead,) = line.dead()
    assert dead.error_type == "ValueError", f"{dead.error_type}: {dead.error_message}"


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_consumer_commits_whose_outcome_is_unknown_apply_each_effect_once(
    db: Database, line: Line, applied: bool
) -> None:
    total = 45
    faults = consumer_line(line, db, outboxer.Retry(max_attempts=1))
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    assert line.send() == total
    faults.on_commit(3, applied=applied)  # a batch's, then one message's alone
    consume_all(line, total)
    assert faults.fired["commit"] == 3, "the fault was not injected"
    assert_each_order_reserved_once(line, total)
    assert not line.dead()


# Which errors say "try again" (no server needed) --------------------------------------------


def test_try_again_knows_deadlocks_lock_waits_and_shutdowns_and_nothing_else() -> None:
    import psycopg.errors
    from sqlalchemy.exc import OperationalError as Wrapped

    from outboxer.diagnosis import try_again

    def wrapped(error: BaseException) -> Wrapped:
        return Wrapped("INSERT ...", {}, error)

    for error in (DEADLOCK, LOCK_WAIT, SHUTDOWN):
        assert try_again(wrapped(pymysql.err.OperationalError(*error))), error
    assert try_again(wrapped(psycopg.errors.DeadlockDetected("deadlock detected")))
    assert try_again(wrapped(psycopg.errors.SerializationFailure("could not serialize")))
    for error in (
        (1062, "Duplicate entry '1' for key 'PRIMARY'"),
        (1317, "Query execution was interrupted"),
        (1969, "Query execution was interrupted (max_statement_time exceeded)"),
        READ_ONLY,
    ):
        assert not try_again(wrapped(pymysql.err.OperationalError(*error))), error
    assert not try_again(wrapped(psycopg.errors.QueryCanceled("statement timeout")))
    assert not try_again(ValueError(1213))


def test_relay_connections_cut_at_random_bytes_lose_nothing_and_keep_key_order(
    db: Database,
) -> None:
    """The relay's MariaDB connections cut through the fault proxy at random byte offsets,
    either way: inside a claim's statements, its result rows, a settle, a commit."""
    total, keys = 2000, 7
    publish_keyed(db.Session, total, keys)
    rng = random.Random(11)
    broker = MemoryBroker()
    with FaultProxy.to(db.url, 3306) as proxy:
        engine = outboxer.relay_engine(proxy.url(db.url), network_timeout=5)
        relay = outboxer.Relay(
            engine, MemoryTransport(broker), batch_size=50, poll_interval=0.05, lease=2.0
        )
        cuts = 0
        with running(relay):
            for _ in range(6):
                fired = proxy.after(
                    bytes=rng.randrange(2_000, 60_000),
                    direction=rng.choice([UP, DOWN]),
                    action=proxy.cut,
                )
                if not fired.wait(10) or count(db.engine, "outboxer_outbox") == 0:
                    break
                cuts += 1
            wait_for(lambda: count(db.engine, "outboxer_outbox") == 0, 20, "the outbox to drain")
        engine.dispose()
    assert cuts >= 4, "the relay drained before the faults could be injected"
    assert_sent_in_key_order([e.payload for e in broker.published], total, keys)
    assert not outboxer.DeadLetters(db.Session).list()


def test_consumer_connections_cut_at_random_bytes_apply_each_effect_once(
    db: Database, line: Line
) -> None:
    """The batching consumer's MariaDB connections cut at random byte offsets either way:
    inside the multi-row inbox insert and its RETURNING rows, a handler's write, a COMMIT."""
    total = 300
    rng = random.Random(5)
    with FaultProxy.to(db.url, 3306) as proxy:
        engine = create_engine(proxy.url(db.url), pool_pre_ping=True)
        sessions = sessionmaker(engine, class_=outboxer.OutboxSession)
        line.consumer = outboxer.Consumer(sessions, name=line.name, retry=outboxer.Retry(1))

        @line.handler()
        def reserve(event: OrderPlaced, session: Session) -> None:
            session.add(Effect(handler="reserve", message_key=str(event.order_id)))

        line.subscribe()
        line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
        assert line.send() == total
        cuts = 0
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                line.consumer.run(line.case.transport, concurrency=2)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=consume, daemon=True)
        worker.start()
        deadline = time.monotonic() + 15
        try:
            while reserved(line) + len(line.dead()) < total or line.pending():
                assert time.monotonic() < deadline, f"{reserved(line)}/{total} handled in time"
                fired = proxy.after(
                    bytes=rng.randrange(500, 20_000),
                    direction=rng.choice([UP, DOWN]),
                    action=proxy.cut,
                )
                if fired.wait(1):
                    cuts += 1
                else:
                    proxy.heal()  # disarm
                line.send()  # retries scheduled through the outbox, if any
        finally:
            line.consumer.stop()
            worker.join(30)
        assert not errors, f"the consumer died: {errors[0]!r}"
        engine.dispose()
    assert cuts >= 3, "the consumer finished before the faults could be injected"
    print(f"\nconsumer: {cuts} cuts, {total} orders, each reserved once")
    assert_each_order_reserved_once(line, total)
    assert not line.dead(), "a cut connection must not make dead letters"


def test_a_real_lock_wait_timeout_between_two_consumers_dead_letters_nothing(
    db: Database, line: Line
) -> None:
    """Not injected: one message delivered twice (a relay that died before its settle),
    to two consumers at once. The first holds its inbox row while its handler runs; the
    second's insert of the same row waits for it and times out (innodb_lock_wait_timeout,
    1 s here; 50 s by default, against a handler that runs longer). The first commits: the
    message was handled once, and nothing is wrong with it."""
    engine = create_engine(db.url, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def short_lock_waits(dbapi_connection: Any, _: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")

    sessions = sessionmaker(engine, class_=outboxer.OutboxSession)
    inside = threading.Event()

    def consumer() -> outboxer.Consumer:
        made = outboxer.Consumer(sessions, name=line.name, retry=outboxer.Retry(1), prefetch=1)

        @made.handler(OrderPlaced, destination=line.destination)
        def reserve(event: OrderPlaced, session: Session) -> None:
            session.add(Effect(handler="reserve", message_key=str(event.order_id)))
            session.flush()
            inside.set()
            time.sleep(2.5)  # the slow handler holding its inbox row

        return made

    first, second = consumer(), consumer()
    line.consumer = first
    line.subscribe()
    line.publish(OrderPlaced(order_id=1))
    line.send_twice()
    errors: list[BaseException] = []

    def run(which: outboxer.Consumer) -> None:
        try:
            which.run(line.case.transport, once=True, idle_timeout=1.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    engine.dispose()
    assert not errors, f"a consumer died: {errors[0]!r}"
    assert inside.is_set()
    assert_each_order_reserved_once(line, 1)
    dead = line.dead()
    assert not dead, f"dead-lettered although handled once: {dead[0].error_message!r}"


def test_an_idle_relay_across_mariadb_restarts_logs_no_pool_error(
    server: PrivateMariaDB, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    engine = outboxer.relay_engine(db.url, network_timeout=5)
    relay = outboxer.Relay(engine, MemoryTransport(MemoryBroker()), poll_interval=0.2)
    with running(relay):
        for _ in range(3):
            time.sleep(0.5)  # the fault's shape: the relay idles on pooled connections first
            server.restart()
        publish_keyed(db.Session, 1, 1)
        wait_for(lambda: count(db.engine, "outboxer_outbox") == 0, 15, "the relay to carry on")
    engine.dispose()
    gc.collect()  # a connection left unclosed is reset (and fails) when it is collected
    errors = [r for r in caplog.records if r.name.startswith("sqlalchemy") and r.levelno >= 40]
    assert not errors, f"{len(errors)} pool errors: {errors[0].getMessage()}"
