"""diagnose(): driver errors that the services here cannot produce (AWS credentials, pika's
refusals) mapped to the operator error and its exit code. The ones they can produce are
tested end to end in test_cli_failures.py."""

from __future__ import annotations

import pika.exceptions
import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
)

from outboxer.diagnosis import diagnose
from outboxer.errors import (
    BrokerAccessDenied,
    BrokerUnavailable,
    InvalidURL,
    OperatorError,
    TransportError,
)

URL = "sqs://KEY:very-secret@?region=eu-west-1"


def wrapped(cause: BaseException) -> TransportError:
    """As the transports raise them: the driver's error in ``__cause__``."""
    try:
        raise TransportError("the broker check failed") from cause
    except TransportError as exc:
        return exc


@pytest.mark.parametrize(
    ("cause", "kind", "code"),
    [
        (
            ClientError({"Error": {"Code": "InvalidClientTokenId"}}, "ListQueues"),
            BrokerAccessDenied,
            8,
        ),
        (
            ClientError({"Error": {"Code": "SignatureDoesNotMatch"}}, "ListQueues"),
            BrokerAccessDenied,
            8,
        ),
        (NoCredentialsError(), BrokerAccessDenied, 8),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), BrokerUnavailable, 7),
        (NoRegionError(), InvalidURL, 3),
        (pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"), BrokerAccessDenied, 8),
        (pika.exceptions.ProbableAccessDeniedError("no access to vhost"), BrokerAccessDenied, 8),
        (pika.exceptions.AMQPConnectionError("refused"), BrokerUnavailable, 7),
        (ConnectionRefusedError(111, "Connection refused"), BrokerUnavailable, 7),
    ],
)
def test_broker_errors_map_to_an_operator_error(
    cause: BaseException, kind: type[OperatorError], code: int
) -> None:
    problem = diagnose(wrapped(cause), broker_url=URL)
    assert isinstance(problem, kind)
    assert problem.exit_code == code
    assert "very-secret" not in str(problem)
    assert problem.__cause__ is not None  # the driver's error stays reachable


def test_an_error_no_rule_names_is_left_alone() -> None:
    assert diagnose(ValueError("a bug")) is None
    throttled = ClientError({"Error": {"Code": "ThrottlingException"}}, "SendMessageBatch")
    assert diagnose(wrapped(throttled), broker_url=URL) is None
