"""What the AWS transports (``sqs://``, ``sns://``) share: their URLs and option checks.

``SCHEME://[KEY:SECRET@]?option=value&...``: no host or path (the endpoint and region are
options), credentials percent-encoded in the user part, every other setting a query
option of a known type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigurationError

__all__ = ["parse_url", "seconds", "whole_number"]


def parse_url(url: str, scheme: str, options: Mapping[str, type]) -> dict[str, Any]:
    """The keyword arguments a ``scheme://`` URL gives, each option converted to its type."""
    parts = urlsplit(url)
    if parts.scheme.lower() != scheme:
        raise ConfigurationError(f"not an {scheme}:// URL: {parts.scheme}://...")
    if "@" in parts.path or "@" in parts.query.split("=", 1)[0]:
        raise ConfigurationError(
            f"the {scheme}:// URL's credentials are malformed: percent-encode '/' in the "
            "secret access key as %2F (and '@' as %40)"
        )
    userinfo, _, host = parts.netloc.rpartition("@")
    if host or parts.path.strip("/"):
        raise ConfigurationError(
            f"an {scheme}:// URL names no host or path; give the endpoint and region as "
            f"options, e.g. {scheme}://?region=eu-west-1 or "
            f"{scheme}://?endpoint_url=http://127.0.0.1:4566"
        )
    kwargs: dict[str, Any] = {}
    if userinfo:
        key, colon, secret = userinfo.partition(":")
        if not key or not colon or not secret:
            raise ConfigurationError(
                f"{scheme}:// URL credentials must be KEY:SECRET ({scheme}://KEY:SECRET@?region=...)"
            )
        kwargs["aws_access_key_id"] = unquote(key)
        kwargs["aws_secret_access_key"] = unquote(secret)
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        kind = options.get(name)
        if kind is None:
            raise ConfigurationError(
                f"unknown {scheme}:// URL option {name!r}; use {', '.join(sorted(options))}"
            )
        raw = values[-1]
        try:
            kwargs[name] = kind(raw)
        except ValueError:
            expected = {int: "a whole number", float: "a number", str: "text"}[kind]
            raise ConfigurationError(
                f"{scheme}:// URL option {name} must be {expected}, got {raw!r}"
            ) from None
    return kwargs


def whole_number(service: str, name: str, value: object, low: int, high: int) -> int:
    """``value`` if it is a whole number from ``low`` to ``high``, else ConfigurationError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(
            f"{service} option {name} must be a whole number from {low} to {high}, got {value!r}"
        )
    return value


def seconds(service: str, name: str, value: object) -> float:
    """``value`` as seconds if it is a number above 0, else ConfigurationError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(
            f"{service} option {name} must be a number of seconds above 0, got {value!r}"
        )
    return float(value)
