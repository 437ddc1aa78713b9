"""``outboxer-inbox`` sends its own consumer's delayed retries and dead-letter replays.

Both are outbox rows in the consumer's database, addressed to the consumer. With only
``outboxer-inbox`` running (no ``outboxer relay`` anywhere) they must still arrive; the
consumer's own relay sends nothing addressed elsewhere; ``--no-relay`` (or
``OUTBOXER_INBOX_RELAY=false``) leaves them to a separate relay. On RabbitMQ, SQS and SNS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.cli import main as outboxer_main

from .broker_cases import BrokerCase
from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .broker_sqs import SNSCase, SQSCase
from .models import Effect, OrderPlaced
from .relaying import OUTBOXER, spawn, stop, wait_for
from .services import RABBITMQ_URL, port_open, require

SessionFactory = sessionmaker[outboxer.OutboxSession]

ON_POSTGRESQL = pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)


@pytest.fixture(params=["rabbitmq", "sqs", "sns"])
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    made: BrokerCase
    if request.param == "rabbitmq":
        require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
        made = RabbitMQCase()
    elif request.param == "sqs":
        made = SQSCase(request.getfixturevalue("moto_endpoint"))
    else:
        made = SNSCase(request.getfixturevalue("moto_endpoint"))
    try:
        yield made
    finally:
        made.close()


class Service:
    """A consumer service (tests.inbox_relay_app) on a fresh destination, whose queue is
    declared and whose first messages are sent by a relay of the test, as a publishing
    service's relay would."""

    def __init__(self, engine: Engine, db_url: str, case: BrokerCase, tmp_path: Path) -> None:
        self.engine = engine
        self.Session: SessionFactory = sessionmaker(engine, class_=outboxer.OutboxSession)
        self.case = case
        self.destination = case.new_destination()
        self.elsewhere = case.new_destination()
        self.name = case.unique("billing")
        if isinstance(case, RabbitMQCase):  # deleted when the case closes
            case.queues.append(self.name)
            case.exchanges.append(self.name)
            self.broker_url = RABBITMQ_URL
        else:
            assert isinstance(case, SQSCase)  # or SNSCase: topics, and queues subscribed
            self.broker_url = f"{case.name}://?region=us-east-1&endpoint_url={case.endpoint}"
        self.fixed = tmp_path / "fixed"
        self.db_url = db_url
        consumer = outboxer.Consumer(self.Session, name=self.name)

        @consumer.handler(OrderPlaced, destination=self.destination)
        def charge(event: OrderPlaced) -> None:  # the subscription the app has
            pass

        case.transport.receiver(consumer.subscription()).close()

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "APP_DB": self.db_url,
            "APP_DESTINATION": self.destination,
            "APP_CONSUMER": self.name,
            "APP_FIXED": str(self.fixed),
            "OUTBOXER_BROKER": self.broker_url,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            **extra,
        }

    def inbox(self, *options: str) -> list[str]:
        command = str(Path(OUTBOXER).parent / "outboxer-inbox")
        return [command, "tests.inbox_relay_app:consumer", *options]

    def publish(self, *orders: int, destination: str | None = None) -> None:
        with self.Session.begin() as session:
            for order in orders:
                session.publish(
                    OrderPlaced(order_id=order), destination=destination or self.destination
                )

    def send_first_deliveries(self) -> None:
        """The publishing side's relay: sends the orders, nothing else."""
        relay = outboxer.Relay(self.engine, self.case.transport, destinations=[self.destination])
        assert relay.run(once=True).sent >= 1

    def charged(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(conn.execute(select(Effect.message_key)).scalars())

    def pending(self) -> list[str]:
        """The destinations of the outbox rows not sent yet."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(outboxer.outbox.c.destination)).scalars())


@pytest.fixture
def service(engine: Engine, db_url: str, case: BrokerCase, tmp_path: Path) -> Service:
    return Service(engine, db_url, case, tmp_path)


@ON_POSTGRESQL
def test_outboxer_inbox_alone_delivers_its_delayed_retries_and_replays(
    service: Service,
) -> None:
    service.publish(1, 2)
    service.send_first_deliveries()
    service.publish(7, destination=service.elsewhere)  # for another service's relay
    worker = spawn(service.inbox(), env=service.env())
    try:
        # Order 1 fails once; its delayed retry is an outbox row for this consumer.
        wait_for(lambda: service.charged()["1"] == 1, 60, "order 1's delayed retry")
        # Order 2 fails twice and is dead-lettered.
        letters = outboxer.DeadLetters(service.Session)
        wait_for(lambda: len(letters.list()) == 1, 60, "order 2's dead letter")
        service.fixed.touch()
        [letter] = letters.list()
        replayed = CliRunner(env={"OUTBOXER_DB": service.db_url}).invoke(
            outboxer_main, ["dead-letter", "replay", str(letter.id)]
        )
        assert replayed.exit_code == 0, replayed.output
        wait_for(lambda: service.charged()["2"] == 1, 60, "order 2's replay")
        # Rows addressed elsewhere are the other service's relay's business.
        assert service.pending() == [service.elsewhere]
    finally:
        log = stop(worker)
    assert service.charged() == {"1": 1, "2": 1}
    assert "sends the retries and replays of" in log, log[-3000:]


@ON_POSTGRESQL
def test_outboxer_inbox_with_its_relay_off_leaves_the_retries_to_a_separate_relay(
    service: Service,
) -> None:
    service.publish(1)
    service.send_first_deliveries()
    worker = spawn(service.inbox(), env=service.env(OUTBOXER_INBOX_RELAY="false"))
    try:
        wait_for(lambda: service.pending() == [service.name], 60, "order 1's retry row")
        # The retry is due after 0.3 s; nobody sends it for the next 3 s.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert service.pending() == [service.name]
            assert service.charged() == {}
            time.sleep(0.2)
        relay = outboxer.Relay(service.engine, service.case.transport)
        assert relay.run(once=True).sent == 1  # a separate relay sends it
        wait_for(lambda: service.charged()["1"] == 1, 60, "order 1's delayed retry")
    finally:
        stop(worker)


def test_outboxer_inbox_on_an_unshared_in_memory_database_asks_for_no_relay(
    tmp_path: Path,
) -> None:
    (tmp_path / "memapp.py").write_text(
        "import outboxer\n"
        "from sqlalchemy import create_engine\n"
        "from sqlalchemy.orm import sessionmaker\n"
        "engine = create_engine('sqlite://')\n"
        "outboxer.create_all(engine)\n"
        "Session = sessionmaker(engine, class_=outboxer.OutboxSession)\n"
        "consumer = outboxer.Consumer(Session, name='mem')\n"
        "@consumer.handler('x.y', destination='z')\n"
        "def handle(event): pass\n"
    )
    inbox = [str(Path(OUTBOXER).parent / "outboxer-inbox"), "memapp:consumer"]
    options = ["--broker", "memory://", "--once"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    refused = subprocess.run(
        [*inbox, *options], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode != 0
    [line] = [x for x in refused.stderr.splitlines() if "--no-relay" in x]
    assert "in-memory SQLite" in line and "Traceback" not in refused.stderr
    accepted = subprocess.run(
        [*inbox, *options, "--no-relay"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert accepted.returncode == 0, accepted.stderr[-2000:]


def test_the_consumers_relay_gets_an_engine_of_its_own_with_a_sync_driver(
    tmp_path: Path,
) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.pool import StaticPool

    from outboxer.relay.embedded import consumer_engine

    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    app = create_engine(url)
    engine, created = consumer_engine(sessionmaker(app, class_=outboxer.OutboxSession))
    assert created and engine is not app and str(engine.url) == url
    async_app = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.sqlite'}")
    engine, created = consumer_engine(async_sessionmaker(async_app))
    assert created and engine.url.drivername == "sqlite+pysqlite"
    assert engine.url.database == str(tmp_path / "app.sqlite")
    pg = create_async_engine("postgresql+psycopg://app@db.invalid/app")
    engine, _ = consumer_engine(async_sessionmaker(pg))
    assert engine.url.drivername == "postgresql+psycopg" and not engine.dialect.is_async
    shared = create_engine("sqlite://", poolclass=StaticPool)
    assert consumer_engine(sessionmaker(shared)) == (shared, False)


ASYNC_APP = """
import os
from dataclasses import dataclass
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
import outboxer

@outboxer.message("asyncapp.ping", destination="asyncapp-pings")
@dataclass
class Ping:
    n: int

engine = create_async_engine(os.environ["ASYNCAPP_DB"], poolclass=NullPool)
Session = async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession)
consumer = outboxer.Consumer(
    Session,
    name="asyncapp",
    retry=outboxer.Retry(max_attempts=2, initial_delay=0.001, max_delay=0.001, jitter=0.0),
)
attempts = []

@consumer.handler(Ping)
async def handle(event: Ping, context: outboxer.Context) -> None:
    attempts.append(context.attempt)
    if context.attempt == 1:
        raise ConnectionError("later, please")
"""


@pytest.mark.parametrize("relay", [True, False], ids=["own-relay", "no-relay"])
def test_outboxer_inbox_once_sends_an_async_consumers_due_retries_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relay: bool
) -> None:
    """With --once the consumer's relay sends what is due when the queue is done, so the
    next --once run processes the retry (here on an async consumer's SQLite file)."""
    from sqlalchemy import create_engine

    from outboxer.cli.inbox import main as inbox_main
    from outboxer.testing import MemoryBroker, MemoryTransport

    path = tmp_path / "asyncapp.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    outboxer.create_all(engine)
    (tmp_path / "asyncapp_module.py").write_text(ASYNC_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ASYNCAPP_DB", f"sqlite+aiosqlite:///{path}")
    import asyncapp_module  # type: ignore[import-not-found]

    broker_name = f"asyncapp-{relay}"
    transport = MemoryTransport(MemoryBroker.named(broker_name))
    transport.receiver(asyncapp_module.consumer.subscription()).close()
    with sessionmaker(engine, class_=outboxer.OutboxSession).begin() as session:
        session.publish(asyncapp_module.Ping(1))
    outboxer.Relay(engine, transport).run(once=True)
    options = ["--broker", f"memory://{broker_name}", "--once", *([] if relay else ["--no-relay"])]
    try:
        for _ in range(2):
            result = CliRunner().invoke(inbox_main, ["asyncapp_module:consumer", *options])
            assert result.exit_code == 0, result.output
    finally:
        sys.modules.pop("asyncapp_module", None)
    with engine.connect() as conn:
        pending = conn.execute(select(outboxer.outbox.c.destination)).scalars().all()
    if relay:
        assert asyncapp_module.attempts == [1, 2] and pending == []
    else:
        assert asyncapp_module.attempts == [1] and pending == ["asyncapp"]
    engine.dispose()
