"""Error mapping: SQS's error codes, and the outcome of a call to SQS that failed.

See the package docstring for which failure is REJECTED, RETRY or UNAVAILABLE. SNS's
calls fail with the same kinds of errors (its own ``InvalidParameter`` among the invalid
requests), so the SNS transport maps them here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from ...diagnosis import AWS_BAD_CREDENTIALS
from ..base import SendResult

# SQS's error codes, without the "AWS.SimpleQueueService." prefix of the query protocol.
_NO_QUEUE = frozenset({"NonExistentQueue", "QueueDoesNotExist"})
_GONE = frozenset(
    {"ReceiptHandleIsInvalid", "InvalidReceiptHandle", "MessageNotInflight", *_NO_QUEUE}
)
_INVALID_REQUEST = frozenset(
    {
        "InvalidParameter",  # SNS
        "InvalidParameterValue",
        "InvalidParameterValueException",
        "InvalidMessageContents",
        "InvalidAttributeName",
        "InvalidAttributeValue",
        "MissingParameter",
        "UnsupportedOperation",
        "BatchRequestTooLong",
        "TooManyEntriesInBatchRequest",
        "BatchEntryIdsNotDistinct",
        "InvalidBatchEntryId",
        "EmptyBatchRequest",
        "ValidationError",
        "ValidationException",
    }
)
_BAD_CREDENTIALS = AWS_BAD_CREDENTIALS


def error_code(exc: ClientError) -> str:
    """SQS's error code of ``exc``, the same for the JSON and the query protocol."""
    error: Mapping[str, Any] = exc.response.get("Error", {})
    code = str(error.get("QueryErrorCode") or error.get("Code") or "")
    if code in _NO_QUEUE or str(error.get("Code", "")).endswith("NonExistentQueue"):
        return "QueueDoesNotExist"
    return code.removeprefix("AWS.SimpleQueueService.")


def _error_message(exc: ClientError) -> str:
    error: Mapping[str, Any] = exc.response.get("Error", {})
    return str(error.get("Message") or exc)


def result_for_error(exc: BaseException, what: str) -> SendResult:
    """The outcome of a whole call to SQS that raised ``exc``."""
    if isinstance(exc, ClientError):
        code = error_code(exc) or "ClientError"
        message = f"{what}: {code}: {_error_message(exc)}"
        if code in _BAD_CREDENTIALS:
            return SendResult.unavailable(code, message)
        if code in _INVALID_REQUEST:
            return SendResult.rejected(code, message)
        # Throttling, 5xx, KMS and access errors (often a fixable policy) and anything
        # unknown: try again with backoff.
        return SendResult.retry(code, message)
    name = type(exc).__name__
    message = f"{what}: {name}: {exc}"
    if isinstance(
        exc, (BotoConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError)
    ):
        return SendResult.unavailable(name, message)
    return SendResult.retry(name, message)
