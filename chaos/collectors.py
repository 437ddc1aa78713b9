"""Plain broker clients that read a scenario's queue and record arrival order in a Ledger.

They use pika and boto3 directly, not outboxer, so that what they see is what the broker
holds. Each runs in a thread, reconnects on its own when the broker goes away (a stopped
RabbitMQ node comes back), and stops on :meth:`close`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pika
import pika.exceptions

from .ledger import Ledger

log = logging.getLogger(__name__)
# A collector reconnects every 0.5 s while a broker is down, and pika logs every failed
# attempt at ERROR with its stack: hundreds of lines that bury a scenario's figures.
for _noisy in ("pika.adapters.utils", "pika.adapters.blocking_connection"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)


class RabbitCollector:
    """Binds a durable queue to ``exchange`` (``#``) and records everything it receives.

    Acknowledges after recording, so nothing is lost when its own connection drops: the
    broker redelivers the unacknowledged messages, flagged ``redelivered``, and the ledger
    does not count those as the relay's duplicates.
    """

    def __init__(self, url: str, exchange: str, ledger: Ledger) -> None:
        self.url = url
        self.exchange = exchange
        self.queue = f"{exchange}-collect"
        self.ledger = ledger
        self._stop = threading.Event()
        self._declare()
        self._thread = threading.Thread(target=self._run, name=f"collect {exchange}", daemon=True)
        self._thread.start()

    def _connect(self) -> pika.BlockingConnection:
        params = pika.URLParameters(self.url)
        params.socket_timeout = params.stack_timeout = 5
        params.heartbeat = 10
        return pika.BlockingConnection(params)

    def _declare(self) -> None:
        connection = self._connect()
        try:
            channel = connection.channel()
            channel.exchange_declare(self.exchange, "topic", durable=True)
            channel.queue_declare(self.queue, durable=True)
            channel.queue_bind(self.queue, self.exchange, "#")
        finally:
            connection.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.debug("collector %s: %r; reconnecting", self.queue, exc)
                self._stop.wait(0.5)

    def _consume(self) -> None:
        connection = self._connect()
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=2000)
            last_tag = 0

            def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
                nonlocal last_tag
                self.ledger.record(body, redelivered=bool(method.redelivered))
                last_tag = method.delivery_tag

            channel.basic_consume(self.queue, on_message)
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)
                if last_tag:
                    channel.basic_ack(last_tag, multiple=True)
                    last_tag = 0
        finally:
            if connection.is_open:
                connection.close()

    def waiting(self) -> int:
        """Messages ready in the queue (not yet handed to this collector)."""
        connection = self._connect()
        try:
            declared = connection.channel().queue_declare(self.queue, passive=True)
            return int(declared.method.message_count)
        finally:
            connection.close()

    def close(self, delete: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if not delete:
            return
        try:
            connection = self._connect()
            channel = connection.channel()
            channel.queue_delete(self.queue)
            channel.exchange_delete(self.exchange)
            connection.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.warning("could not delete %s: %r", self.queue, exc)


class SQSCollector:
    """Receives from an SQS queue (FIFO or standard) through boto3 and deletes what it
    recorded. A FIFO queue hands out a group's messages in order, one batch at a time."""

    def __init__(self, endpoint: str, queue: str, ledger: Ledger) -> None:
        import boto3

        self.ledger = ledger
        self.client = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
        fifo = queue.endswith(".fifo")
        created = self.client.create_queue(
            QueueName=queue, Attributes={"FifoQueue": "true"} if fifo else {}
        )
        self.queue_url = created["QueueUrl"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"collect {queue}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.client.receive_message(
                    QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                ).get("Messages", [])
            except Exception as exc:  # a moto hiccup: try again
                log.debug("collector: %r", exc)
                self._stop.wait(0.5)
                continue
            for message in got:
                self.ledger.record(message["Body"].encode())
            if got:
                self.client.delete_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(got)
                    ],
                )

    def waiting(self) -> int:
        """Messages in the queue, received but not yet deleted included."""
        attributes = self.client.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return sum(int(v) for v in attributes.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.close()


def wait_until(condition: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition()`` until true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
