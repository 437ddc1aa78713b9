"""Amazon SNS through boto3: fan-out, each consumer's SQS queue subscribed to topics.

``sqs://`` is point to point: every consumer that reads a destination's queue competes for
its messages, so two consumers of one type split them. ``sns://`` is publish/subscribe,
the AWS way of RabbitMQ's exchanges and bindings:

* a destination is an SNS **topic** of that name (``destination="orders"`` is topic
  ``orders``; a name ending in ``.fifo`` is a FIFO topic), and the relay publishes each
  message to its destination's topic;
* a consumer reads its own SQS **queue**, named after it, which ``outboxer-inbox``
  creates and subscribes to the topic of each destination it handles, with raw message
  delivery (the queue gets the body and attributes as the relay sent them) and a filter
  policy on ``outboxer-type`` (the queue gets only the types the consumer handles, as a
  RabbitMQ binding's routing key does); the queue's policy lets those topics send to it;
* a consumer's retries and replays are published to the topic named after the consumer,
  to which its queue subscribes without a filter.

A FIFO topic can only deliver to a FIFO queue: a consumer that handles types of FIFO
topics also gets the queue ``<name>.fifo``, subscribed to those, and reads both. Messages
on FIFO topics keep the SQS transport's ids: ``MessageGroupId`` is the key and
``MessageDeduplicationId`` is the message id and outbox row (see
:mod:`outboxer.transports.sqs`).

Sending works like SQS's (:mod:`outboxer.transports.lanes`): ``PublishBatch`` calls of
ten, on parallel lanes, a key's messages in order on one lane, the same error mapping. A
topic is resolved once with ``CreateTopic`` (idempotent: it returns the ARN of the topic
of that name), and the types its subscriptions' filters take are read with it (once per
topic, again after a miss). SNS drops a message no subscription takes, so a topic without
subscriptions, or a type none of them takes, is REJECTED as ``unroutable``, as RabbitMQ
returns a message no queue is bound for (the relay retries it a few times: the consumer
may still be starting).
"""

from __future__ import annotations

from .transport import SNSTransport

__all__ = ["SNSTransport"]
