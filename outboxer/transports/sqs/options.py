"""The transport's options: SQS's limits, validation, and parsing an ``sqs://`` URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ...errors import ConfigurationError

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
MAX_BATCH_ENTRIES = 10
MAX_WAIT_SECONDS = 20
MAX_VISIBILITY_SECONDS = 12 * 3600

_URL_OPTIONS = {
    "region": str,
    "endpoint_url": str,
    "concurrency": int,
    "max_message_bytes": int,
    "connect_timeout": float,
    "read_timeout": float,
    "visibility_timeout": int,
    "profile": str,
}


def _parse_url(url: str) -> dict[str, Any]:
    """The keyword arguments an ``sqs://`` URL gives :meth:`SQSTransport.from_url`."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqs":
        raise ConfigurationError(f"not an sqs:// URL: {parts.scheme}://...")
    if "@" in parts.path or "@" in parts.query.split("=", 1)[0]:
        raise ConfigurationError(
            "the sqs:// URL's credentials are malformed: percent-encode '/' in the secret "
            "access key as %2F (and '@' as %40)"
        )
    userinfo, _, host = parts.netloc.rpartition("@")
    if host or parts.path.strip("/"):
        raise ConfigurationError(
            "an sqs:// URL names no host or path; give the endpoint and region as options, "
            "e.g. sqs://?region=eu-west-1 or sqs://?endpoint_url=http://127.0.0.1:4566"
        )
    kwargs: dict[str, Any] = {}
    if userinfo:
        key, colon, secret = userinfo.partition(":")
        if not key or not colon or not secret:
            raise ConfigurationError(
                "sqs:// URL credentials must be KEY:SECRET (sqs://KEY:SECRET@?region=...)"
            )
        kwargs["aws_access_key_id"] = unquote(key)
        kwargs["aws_secret_access_key"] = unquote(secret)
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        kind = _URL_OPTIONS.get(name)
        if kind is None:
            raise ConfigurationError(
                f"unknown sqs:// URL option {name!r}; use {', '.join(sorted(_URL_OPTIONS))}"
            )
        raw = values[-1]
        try:
            kwargs[name] = kind(raw)
        except ValueError:
            expected = {int: "a whole number", float: "a number", str: "text"}[kind]
            raise ConfigurationError(
                f"sqs:// URL option {name} must be {expected}, got {raw!r}"
            ) from None
    return kwargs


def _positive_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(
            f"SQS option {name} must be a whole number from {low} to {high}, got {value!r}"
        )
    return value


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(
            f"SQS option {name} must be a number of seconds above 0, got {value!r}"
        )
    return float(value)
