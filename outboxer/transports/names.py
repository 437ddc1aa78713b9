"""The names each broker accepts for destinations and consumers, checked before use.

A destination (a message type's ``destination=``) and a consumer's name become broker
objects: RabbitMQ exchanges and queues, SQS queues. A name the broker refuses would
otherwise surface as an obscure broker error at the first send, or as a dead letter.
:func:`name_problem` says what is wrong and what to use instead; the transports raise it
as :class:`~outboxer.errors.InvalidName` (``Transport.validate_name``).

* RabbitMQ: at most 255 bytes of UTF-8, and not starting with ``amq.`` (reserved for the
  broker's own exchanges and queues);
* SQS: 1 to 80 characters, only ASCII letters, digits, ``-`` and ``_``; a FIFO queue's
  name ends in ``.fifo`` (counted in the 80). So ``shop.orders`` is refused: use
  ``shop-orders``.
* SNS (``sns://``): the SQS rule, for a consumer's name becomes both a topic and a queue
  (SNS topic names allow the same characters, up to 256).
"""

from __future__ import annotations

import re

from ..errors import InvalidName

__all__ = ["name_problem", "require_valid_name"]

RABBITMQ_MAX_BYTES = 255
SQS_MAX_CHARACTERS = 80
_SQS_NAME = re.compile(r"[A-Za-z0-9_-]+(\.fifo)?")


def name_problem(broker: str, name: str) -> str | None:
    """Why ``broker`` (``rabbitmq``, ``sqs`` or ``sns``; others accept anything) would refuse
    ``name``, with what to use instead; ``None`` when it is fine."""
    if not name or not name.strip():
        return "a destination or consumer name cannot be empty"
    if broker == "rabbitmq":
        size = len(name.encode("utf-8"))
        if size > RABBITMQ_MAX_BYTES:
            return (
                f"RabbitMQ names are at most {RABBITMQ_MAX_BYTES} bytes; {_shown(name)} has "
                f"{size}: use a shorter name"
            )
        if name.startswith("amq."):
            return (
                f"RabbitMQ reserves names starting with 'amq.' for itself; rename "
                f"{_shown(name)} (e.g. {name[4:] or 'orders'!r})"
            )
    if broker in ("sqs", "sns") and (
        len(name) > SQS_MAX_CHARACTERS or not _SQS_NAME.fullmatch(name)
    ):
        pasted = _aws_address(broker, name)
        if pasted is not None:
            return pasted
        suggestion = re.sub(r"[^A-Za-z0-9_-]", "-", name.removesuffix(".fifo"))
        suggestion = suggestion[: SQS_MAX_CHARACTERS - 5 * name.endswith(".fifo")]
        suggestion += ".fifo" if name.endswith(".fifo") else ""
        return (
            f"SQS queue names have 1 to {SQS_MAX_CHARACTERS} characters: letters, "
            f"digits, '-' and '_' (and '.fifo' at the end of a FIFO queue's name); "
            f"{_shown(name)} is not one: use {suggestion!r}"
        )
    return None


_ARN = re.compile(r"arn:aws[a-z-]*:(?P<service>[a-z0-9-]+):[^:]*:[^:]*:(?P<name>[^:/]+)")
_QUEUE_URL = re.compile(r"https?://[^/]+/[^/]+/(?P<name>[^/?#]+)/?")


def _aws_address(broker: str, name: str) -> str | None:
    """What to use instead when ``name`` is an SQS queue URL or an SQS or SNS ARN (what
    the AWS console shows) rather than a name; None when it is neither."""
    found = _ARN.fullmatch(name)
    if found is not None:
        service, address = found.group("service"), "ARN"
    else:
        found = _QUEUE_URL.fullmatch(name)
        if found is None:
            return None
        service, address = "sqs", "URL"
    kind = {"sqs": "queue", "sns": "topic"}.get(service)
    if kind is None:
        return None
    short = found.group("name")
    given = f"{_shown(name)} is the {address} of an {service.upper()} {kind}"
    if service == broker:
        return f"{given}: give its name alone, {short!r}"
    return (
        f"{given}, and this broker is {broker.upper()}: to send to that {kind}, use an "
        f"{service}:// broker URL and the destination {short!r}"
    )


def require_valid_name(broker: str, name: str, what: str) -> None:
    """Raise :class:`~outboxer.errors.InvalidName` if ``broker`` would refuse ``name``;
    ``what`` says where the name comes from (``destination of orders.placed``)."""
    problem = name_problem(broker, name)
    if problem is not None:
        raise InvalidName(f"{what} {_shown(name)}: {problem}")


def _shown(name: str) -> str:
    return repr(name if len(name) <= 60 else name[:57] + "...")
