"""The fault scenarios of issue 8, each a function returning its Figures.

Every scenario drains messages through the real ``outboxer relay`` command (default
options: batch 1000, lease 60 s) while a fault hits it, and a plain client records what
reaches the broker. Faults that stop a broker or restart a database use private instances
(chaos.private); cuts go through the fault proxy (tests/faultproxy.py) in front of the
shared services, so nobody else's connections are touched.
"""

from __future__ import annotations

import random
import threading
import time
from urllib.parse import urlsplit

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

import outboxer
from tests.faultproxy import DOWN, UP, FaultProxy

from .drain import Drain, cut_loop, kill_loop, rabbitmq_drain, sqs_drain
from .ledger import Figures
from .private import private_mariadb, private_rabbitmq, stoppable_postgresql, stoppable_rabbitmq
from .world import PG_SERVER, RABBITMQ_URL, RelayProcess, fresh_database

RECOVER_TIMEOUT = 120.0  # longer than the relay's 60 s lease: a stall shows as its length
# The collector reconnects to a restarted broker too (every 0.5 s), and then receives what
# was in its queue: arrivals in the first second after the broker is back do not count.
COLLECTOR_SETTLE = 1.0


def relay(
    drain: Drain, db_url: str, broker_url: str, *args: str, name: str = "relay"
) -> RelayProcess:
    process = RelayProcess(db_url, broker_url, *args, name=name)
    drain.relays.append(process)
    process.start()
    return process


def kill_rabbitmq(
    messages: int = 100_000,
    kills: int = 20,
    keys: int = 100,
    seed: int = 0,
    spacing: tuple[int, int] = (0, 4000),
) -> Figures:
    """The relay SIGKILLed ``kills`` times at random moments of a drain to RabbitMQ."""
    rng = random.Random(seed)
    with (
        fresh_database() as db,
        rabbitmq_drain("kill-rabbitmq", db, RABBITMQ_URL, messages, keys) as drain,
    ):
        process = relay(drain, db, RABBITMQ_URL)
        drain.wait_started()
        kill_loop(drain, process, kills, rng, RECOVER_TIMEOUT, spacing)
        return drain.finish()


def kill_sqs(
    messages: int = 2_000,
    kills: int = 5,
    keys: int = 30,
    seed: int = 0,
    spacing: tuple[int, int] = (0, 300),
) -> Figures:
    """The same on an SQS FIFO queue of moto's server. moto takes tens of milliseconds a
    call, so the relay claims 100 rows at a time (``--batch-size 100``): with the default
    1,000 the first claim would take the whole backlog and a kill would hit no drain."""
    from bench.relay import moto_server

    rng = random.Random(seed)
    with moto_server() as endpoint, fresh_database() as db:
        broker = f"sqs://?region=us-east-1&endpoint_url={endpoint}"
        with sqs_drain("kill-sqs", db, endpoint, messages, keys) as drain:
            process = relay(drain, db, broker, "--batch-size", "100")
            drain.wait_started()
            kill_loop(drain, process, kills, rng, RECOVER_TIMEOUT, spacing)
            return drain.finish()


def rabbitmq_stop(
    messages: int = 100_000, keys: int = 100, down: float = 10.0, seed: int = 0
) -> Figures:
    """RabbitMQ (a private node: ``stop_app``) stopped for ``down`` seconds mid-drain."""
    with (
        stoppable_rabbitmq(RABBITMQ_URL) as broker,
        fresh_database() as db,
        rabbitmq_drain("rabbitmq-stop", db, broker.direct_url, messages, keys) as drain,
    ):
        relay(drain, db, broker.relay_url)
        drain.wait_started(0.2)
        broker.stop()
        time.sleep(down)
        broker.start()
        back = time.monotonic()
        drain.recovered(back, drain.pending(), RECOVER_TIMEOUT, settle=COLLECTOR_SETTLE)
        drain.notes.append(f"RabbitMQ: {broker.kind}")
        return drain.finish(down_seconds=down)


def rabbitmq_alarm(
    messages: int = 100_000, keys: int = 100, blocked: float = 60.0, seed: int = 0
) -> Figures:
    """A disk alarm on RabbitMQ (a private node) for ``blocked`` seconds as the relay starts
    a drain: the broker blocks the relay's connection (``connection.blocked``) and stops
    reading from it, for longer than the relay's 30 s confirm timeout. Nothing may be lost
    or sent twice."""
    with (
        private_rabbitmq() as node,
        fresh_database() as db,
        rabbitmq_drain("rabbitmq-alarm", db, node.url, messages, keys) as drain,
    ):
        # The alarm first: setting it takes the CLI a second or two, in which the relay
        # would have sent most of the drain. The relay's connection is blocked by its
        # first publish, with its first batches on the wire.
        node.alarm()
        try:
            relay(drain, db, node.url)
            time.sleep(blocked)
            drain.notes.append(f"{drain.ledger.delivered} delivered during the {blocked:g} s alarm")
        finally:
            node.alarm(False)
        back = time.monotonic()
        drain.recovered(back, drain.pending(), RECOVER_TIMEOUT, settle=COLLECTOR_SETTLE)
        return drain.finish(blocked_seconds=blocked)


def cut_rabbitmq(
    messages: int = 200_000, cuts: int = 50, keys: int = 100, seed: int = 0
) -> Figures:
    """The relay<->RabbitMQ connection cut ``cuts`` times at random byte offsets (either
    direction: publishes go up, confirms come down). 200,000 messages: the relay sends a
    few thousand while every key recovers from a cut, and 100,000 ran out after 29 cuts."""
    return cut_connections(
        "cut-rabbitmq", RABBITMQ_URL, 5672, messages, cuts, keys, seed, up=60_000, down=600
    )


def cut_postgresql(
    messages: int = 100_000, cuts: int = 50, keys: int = 100, seed: int = 0
) -> Figures:
    """The relay<->PostgreSQL connections cut ``cuts`` times at random byte offsets (claims
    come down with the payloads; settles go up)."""
    return cut_connections(
        "cut-postgresql", PG_SERVER, 5432, messages, cuts, keys, seed, up=40_000, down=400_000
    )


def cut_connections(
    name: str,
    server: str,
    default_port: int,
    messages: int,
    cuts: int,
    keys: int,
    seed: int,
    *,
    up: int,
    down: int,
) -> Figures:
    """The relay's connections to ``server`` go through a fault proxy that cuts them, each
    time after a random number of bytes (below ``up`` or ``down``, either way at random)."""
    rng = random.Random(seed)
    parts = urlsplit(server)
    with (
        FaultProxy(parts.hostname or "127.0.0.1", parts.port or default_port) as proxy,
        fresh_database() as db,
        rabbitmq_drain(name, db, RABBITMQ_URL, messages, keys) as drain,
    ):
        if server == RABBITMQ_URL:
            relay(drain, db, proxy.url(RABBITMQ_URL))
        else:
            relay(drain, proxy.url(db), RABBITMQ_URL)
        drain.wait_started()

        def arm(rng: random.Random) -> threading.Event:
            if rng.random() < 0.5:
                return proxy.cut_after(rng.randrange(up), UP)
            return proxy.cut_after(rng.randrange(down), DOWN)

        cut_loop(drain, arm, cuts, rng, RECOVER_TIMEOUT)
        return drain.finish(connections=proxy.stats.connections)


def postgresql_restart(messages: int = 100_000, keys: int = 100, seed: int = 0) -> Figures:
    """PostgreSQL (a private cluster) restarted (``pg_ctl restart -m fast``) mid-drain."""
    with stoppable_postgresql(PG_SERVER) as server, fresh_database(server.direct_url) as db:
        relay_db = make_url(db).set(
            host=make_url(server.relay_url).host, port=make_url(server.relay_url).port
        )
        with rabbitmq_drain("postgresql-restart", db, RABBITMQ_URL, messages, keys) as drain:
            relay(drain, relay_db.render_as_string(hide_password=False), RABBITMQ_URL)
            drain.wait_started(0.2)
            server.restart()
            back = time.monotonic()
            drain.recovered(back, drain.pending(), RECOVER_TIMEOUT)
            drain.notes.append(f"PostgreSQL: {server.kind}")
            return drain.finish()


def mariadb_restart(
    messages: int = 100_000, keys: int = 100, seed: int = 0, crash: bool = False
) -> Figures:
    """MariaDB (a private server) restarted mid-drain: a clean shutdown, every connection
    killed and statements in progress failed, then a start on the same data; with
    ``crash``, SIGKILL and InnoDB's recovery instead."""
    with private_mariadb() as server:
        engine = create_engine(server.server)
        outboxer.create_all(engine)
        engine.dispose()
        name = "mariadb-crash" if crash else "mariadb-restart"
        with rabbitmq_drain(name, server.server, RABBITMQ_URL, messages, keys) as drain:
            relay(drain, server.server, RABBITMQ_URL)
            drain.wait_started(0.2)
            if crash:
                server.kill()
                server.start_again()
            else:
                server.restart()
            back = time.monotonic()
            drain.recovered(back, drain.pending(), RECOVER_TIMEOUT)
            drain.notes.append("MariaDB: a private server, " + ("SIGKILL" if crash else "restart"))
            return drain.finish()


def mariadb_crash(messages: int = 100_000, keys: int = 100, seed: int = 0) -> Figures:
    """MariaDB (a private server) SIGKILLed mid-drain, then started on its data again."""
    return mariadb_restart(messages, keys, seed, crash=True)
