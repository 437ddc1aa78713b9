"""The fault proxy in front of the real services, as their clients see each fault: pika on
RabbitMQ, psycopg (through SQLAlchemy) on PostgreSQL, PyMySQL on MariaDB, boto3 on moto."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from sqlalchemy import create_engine, exc, text
from sqlalchemy.engine import Engine

from .broker_rabbitmq import rabbitmq_address
from .faultproxy import DOWN, UP, FaultProxy
from .services import RABBITMQ_URL, SERVERS, port_open, require

# RabbitMQ ----------------------------------------------------------------------------------


@pytest.fixture
def rabbit_proxy() -> Iterator[FaultProxy]:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start it with: rabbitmq-server -detached")
    with FaultProxy(*rabbitmq_address()) as proxy:
        yield proxy


def pika_connection(proxy: FaultProxy) -> pika.BlockingConnection:
    params = pika.URLParameters(proxy.url(RABBITMQ_URL))
    params.socket_timeout = params.stack_timeout = params.blocked_connection_timeout = 5
    return pika.BlockingConnection(params)


def test_a_cut_closes_a_pika_connection_and_a_new_one_works(rabbit_proxy: FaultProxy) -> None:
    connection = pika_connection(rabbit_proxy)
    channel = connection.channel()
    channel.queue_declare("", exclusive=True)
    assert rabbit_proxy.cut() == 1
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        channel.queue_declare("", exclusive=True)
    assert connection.is_closed
    again = pika_connection(rabbit_proxy)
    again.channel().queue_declare("", exclusive=True)
    again.close()


@pytest.mark.parametrize("offset", [0, 7, 300])
def test_a_cut_inside_the_amqp_handshake_fails_the_pika_connect(
    rabbit_proxy: FaultProxy, offset: int
) -> None:
    # 0: the protocol header; 7: inside it; 300: inside connection.start (~500 bytes)
    fired = rabbit_proxy.cut_after(offset, DOWN if offset else UP)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika_connection(rabbit_proxy)
    assert fired.is_set()


def test_a_refusing_rabbitmq_fails_connect_and_comes_back(rabbit_proxy: FaultProxy) -> None:
    for how in ("closed", "reset"):
        rabbit_proxy.refuse(how)
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika_connection(rabbit_proxy)
        rabbit_proxy.up()
        pika_connection(rabbit_proxy).close()


def test_a_stall_delays_pika_and_the_connection_survives(rabbit_proxy: FaultProxy) -> None:
    connection = pika_connection(rabbit_proxy)
    channel = connection.channel()
    rabbit_proxy.stall(1.5)
    started = time.monotonic()
    channel.queue_declare("", exclusive=True)
    assert time.monotonic() - started >= 1.4
    connection.close()


# PostgreSQL and MariaDB ----------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "mariadb"])
def db_proxy(request: pytest.FixtureRequest) -> Iterator[tuple[FaultProxy, Engine]]:
    """A proxy in front of the database server, and an engine that connects through it
    (2 s connect timeout; on MariaDB also a 2 s read timeout, which psycopg lacks)."""
    server = SERVERS[request.param]
    require(request.param, server.available, server.admin_url)
    default_port = 5432 if request.param == "postgresql" else 3306
    timeouts = {"connect_timeout": 2}
    if request.param == "mariadb":
        timeouts["read_timeout"] = 2
    with FaultProxy.to(server.admin_url, default_port) as proxy:
        engine = create_engine(proxy.url(server.admin_url), connect_args=timeouts)
        yield proxy, engine
        engine.dispose()


def select_one(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT 1")).scalar_one())


def test_a_cut_fails_the_query_as_a_disconnect_and_the_pool_reconnects(
    db_proxy: tuple[FaultProxy, Engine],
) -> None:
    proxy, engine = db_proxy
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        proxy.cut()
        with pytest.raises(exc.OperationalError) as raised:
            conn.execute(text("SELECT 1"))
        assert raised.value.connection_invalidated
    assert select_one(engine) == 1


def test_a_cut_at_a_random_point_of_the_login_fails_connect(
    db_proxy: tuple[FaultProxy, Engine],
) -> None:
    proxy, engine = db_proxy
    for offset in (0, 5, 40):  # the first server bytes are the greeting / auth request
        proxy.cut_after(offset, DOWN)
        with pytest.raises(exc.OperationalError):
            select_one(engine)
    assert select_one(engine) == 1


def test_a_refusing_database_fails_connect_and_comes_back(
    db_proxy: tuple[FaultProxy, Engine],
) -> None:
    proxy, engine = db_proxy
    proxy.down()
    with pytest.raises(exc.OperationalError):
        select_one(engine)
    proxy.up()
    assert select_one(engine) == 1


def test_a_stalled_login_times_out_and_a_short_stall_only_delays(
    db_proxy: tuple[FaultProxy, Engine],
) -> None:
    proxy, engine = db_proxy
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(exc.OperationalError):
        select_one(engine)  # connect_timeout=2
    assert 1.5 <= time.monotonic() - started < 15
    proxy.heal()
    with engine.connect() as conn:
        proxy.stall(1.0)
        started = time.monotonic()
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert time.monotonic() - started >= 0.9


@pytest.mark.parametrize("db_proxy", ["mariadb"], indirect=True)  # psycopg: no read timeout
def test_a_stall_makes_a_mariadb_query_time_out(db_proxy: tuple[FaultProxy, Engine]) -> None:
    proxy, engine = db_proxy
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        proxy.stall(10, direction=DOWN)
        with pytest.raises(exc.OperationalError, match="timed out"):
            conn.execute(text("SELECT 1"))
    proxy.heal()
    assert select_one(engine) == 1


# moto (SQS over HTTP) --------------------------------------------------------------------------


@pytest.fixture
def sqs_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy.to(moto_endpoint, 80, http=True) as proxy:
        yield proxy


def sqs_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=2, tcp_keepalive=False
    )
    return boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", config=config)


def send_batch(client: Any, queue_url: str, start: int) -> None:
    entries = [{"Id": str(i), "MessageBody": str(start + i)} for i in range(10)]
    response = client.send_message_batch(QueueUrl=queue_url, Entries=entries)
    assert not response.get("Failed")


def queue_size(endpoint: str, queue_url: str) -> int:
    client = sqs_client(endpoint)
    attributes = client.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def test_requests_are_counted_and_a_cut_after_the_second_one_fails_only_that_call(
    sqs_proxy: FaultProxy, moto_endpoint: str
) -> None:
    import botocore.exceptions

    client = sqs_client(sqs_proxy.endpoint)
    queue_url = client.create_queue(QueueName=f"proxy-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    assert sqs_proxy.stats.requests == 1
    fired = sqs_proxy.after(requests=2, action=sqs_proxy.cut)
    send_batch(client, queue_url, 0)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        send_batch(client, queue_url, 10)
    assert fired.is_set()
    send_batch(client, queue_url, 20)
    assert sqs_proxy.stats.requests == 4


def test_a_response_lost_after_the_request_arrived_is_the_unconfirmed_send(
    sqs_proxy: FaultProxy, moto_endpoint: str
) -> None:
    import botocore.exceptions

    client = sqs_client(sqs_proxy.endpoint)
    queue_url = client.create_queue(QueueName=f"proxy-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    sqs_proxy.after(requests=1, action=lambda: sqs_proxy.blackhole(DOWN))
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        send_batch(client, queue_url, 0)
    assert queue_size(moto_endpoint, queue_url) == 10  # SQS has them; the sender cannot know
    sqs_proxy.heal()
    send_batch(client, queue_url, 10)
    assert queue_size(moto_endpoint, queue_url) == 20


def test_a_refusing_endpoint_fails_the_call_and_comes_back(
    sqs_proxy: FaultProxy, moto_endpoint: str
) -> None:
    import botocore.exceptions

    client = sqs_client(sqs_proxy.endpoint)
    sqs_proxy.down()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.list_queues()
    sqs_proxy.up()
    client.list_queues()
    assert sqs_proxy.stats.bytes_up > 0
