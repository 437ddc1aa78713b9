"""The sqs and sns BrokerCases and fixtures: moto's standalone server, started once per session.

moto slows as a queue fills and allows one purge a minute, so every test uses fresh,
small, uniquely named queues and never purges.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from outboxer.transports import Transport

from .broker_cases import BrokerCase
from .services import require

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """Dummy AWS credentials in the environment for the session, restored afterwards."""
    saved = {name: os.environ.get(name) for name in DUMMY_CREDENTIALS}
    os.environ.update(DUMMY_CREDENTIALS)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def moto_server(aws_credentials: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's SQS server on a free local port, for the whole session; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A file, not a pipe: moto logs every request, and a full pipe would block it.
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            require("moto server", False, f"cannot start it: {exc}")
            raise  # not reached: require() skipped or failed
    try:
        deadline = time.monotonic() + 30
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                lines = log_path.read_text(errors="replace").strip().splitlines()
                require("moto server", False, f"it did not start on {url}: {lines[-1:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def moto_endpoint(moto_server: str) -> str:
    """The moto server's endpoint URL (boto3 ``endpoint_url``)."""
    return moto_server


class SQSCase(BrokerCase):
    name = "sqs"

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.transport = self.make(endpoint)

    def make(self, endpoint: str, **options: float) -> Transport:
        """This case's transport (the URL scheme is the case's name) on ``endpoint``."""
        import outboxer

        url = f"{self.name}://?region=us-east-1&endpoint_url={endpoint}"
        return outboxer.transport_from_url(url, **options)

    def new_destination(self) -> str:
        import boto3

        name = self.unique("dest")
        client = boto3.client("sqs", endpoint_url=self.endpoint, region_name="us-east-1")
        client.create_queue(QueueName=name)
        client.close()
        return name

    def unroutable_destination(self) -> str:
        return self.unique("no-such-queue")

    def unreachable_transport(self) -> Transport:
        endpoint = f"http://127.0.0.1:{free_port()}"
        return self.make(endpoint, connect_timeout=1.0, read_timeout=2.0)


@pytest.fixture
def aws(moto_endpoint: str) -> Iterator[tuple[Any, Any]]:
    """Plain boto3 clients (SNS, SQS) on moto, to set up or look at things behind
    outboxer's back."""
    import boto3

    sns = boto3.client("sns", endpoint_url=moto_endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    yield sns, sqs
    sns.close()
    sqs.close()


@pytest.fixture
def sqs_case(moto_endpoint: str) -> SQSCase:
    return SQSCase(moto_endpoint)


class SNSCase(SQSCase):
    """SNS topics (created by the consumer that subscribes) and SQS queues, on moto."""

    name = "sns"

    def new_destination(self) -> str:
        return self.unique("topic")

    def unroutable_destination(self) -> str:
        return self.unique("no-subscriber")


@pytest.fixture
def sns_case(moto_endpoint: str) -> SNSCase:
    return SNSCase(moto_endpoint)
