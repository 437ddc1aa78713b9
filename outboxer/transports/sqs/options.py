"""The transport's options: SQS's limits, validation, and parsing an ``sqs://`` URL."""

from __future__ import annotations

from typing import Any

from ..aws import parse_url, seconds, whole_number

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
MAX_BATCH_ENTRIES = 10
MAX_WAIT_SECONDS = 20
MAX_VISIBILITY_SECONDS = 12 * 3600

URL_OPTIONS: dict[str, type] = {
    "region": str,
    "endpoint_url": str,
    "concurrency": int,
    "max_message_bytes": int,
    "connect_timeout": float,
    "read_timeout": float,
    "visibility_timeout": int,
    "profile": str,
}
"""The ``sqs://`` URL's options and their types (the ``sns://`` URL takes the same)."""


def _parse_url(url: str) -> dict[str, Any]:
    """The keyword arguments an ``sqs://`` URL gives :meth:`SQSTransport.from_url`."""
    return parse_url(url, "sqs", URL_OPTIONS)


def _positive_int(name: str, value: object, low: int, high: int) -> int:
    return whole_number("SQS", name, value, low, high)


def _positive_float(name: str, value: object) -> float:
    return seconds("SQS", name, value)
