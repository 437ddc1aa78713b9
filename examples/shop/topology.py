"""Show the AWS topology the shop's consumers set up: ``python -m shop.topology``.

For each SNS topic the shop uses (its destination, and one per consumer for retries and
replays), the SQS queues subscribed to it and the message types each receives (its filter
policy), then each queue's policy: which topics may send to it. Uses ``OUTBOXER_BROKER``
(an ``sns://`` URL) for the region, endpoint and credentials.
"""

from __future__ import annotations

import json
import os

import outboxer
from outboxer.transports.sns import SNSTransport

from .app import audit, billing


def main() -> None:
    transport = outboxer.transport_from_url(os.environ["OUTBOXER_BROKER"])
    if not isinstance(transport, SNSTransport):
        raise SystemExit("OUTBOXER_BROKER is not an sns:// URL: there is no SNS topology")
    with transport:
        sns, sqs = transport.client, transport.queues.client
        queues: set[str] = set()
        wanted = set()
        for consumer in (billing, audit):
            wanted.add(consumer.name)
            wanted.update(destination for destination, _ in consumer.subscription().bindings)
        for topic in sns.list_topics().get("Topics", []):
            arn = topic["TopicArn"]
            if arn.rsplit(":", 1)[-1] not in wanted:
                continue
            subscriptions = sns.list_subscriptions_by_topic(TopicArn=arn)["Subscriptions"]
            if not subscriptions:
                continue
            print(f"SNS topic {arn.rsplit(':', 1)[-1]}")
            for subscription in subscriptions:
                queue = subscription["Endpoint"].rsplit(":", 1)[-1]
                queues.add(queue)
                attributes = sns.get_subscription_attributes(
                    SubscriptionArn=subscription["SubscriptionArn"]
                )["Attributes"]
                policy = json.loads(attributes.get("FilterPolicy") or "{}")
                types = ", ".join(policy.get("outboxer-type", [])) or "every type"
                raw = attributes.get("RawMessageDelivery")
                print(f"  -> SQS queue {queue} ({types}; raw delivery {raw})")
        for queue in sorted(queues):
            url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
            found = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])
            statements = json.loads(found.get("Attributes", {}).get("Policy", "{}"))
            for statement in statements.get("Statement", []):
                allowed = statement["Condition"]["ArnEquals"]["aws:SourceArn"]
                topics = ", ".join(sorted(a.rsplit(":", 1)[-1] for a in allowed))
                print(f"SQS queue {queue} accepts messages from SNS topics {topics}")


if __name__ == "__main__":
    main()
