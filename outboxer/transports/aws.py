"""What the AWS transports (``sqs://``, ``sns://``) share: URLs, option checks, sessions.

``SCHEME://[KEY:SECRET@]?option=value&...``: no host or path (the endpoint and region are
options), credentials percent-encoded in the user part, every other setting a query
option of a known type. :class:`ClientOptions` (the constructors' shared keywords),
:func:`open_session` and :func:`client_config` build the boto3 clients the same way for
both: the region from the options or boto3's chain, two attempts per call, short connect
timeouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError

from ..errors import ConfigurationError
from ..instrumentation import TransportDescription

__all__ = [
    "ClientOptions",
    "client_config",
    "describe",
    "open_session",
    "parse_url",
    "seconds",
    "whole_number",
]


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


_REGION = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
"""What botocore takes as a region name (eu-west-1, us-gov-west-1, local ones alike)."""


def open_session(
    service: str,
    *,
    region: str | None,
    endpoint_url: str | None,
    aws_access_key_id: str | None,
    aws_secret_access_key: str | None,
    aws_session_token: str | None,
    profile: str | None,
) -> tuple[boto3.session.Session, str]:
    """A boto3 session for ``service`` (``SQS``, ``SNS``) and the region its clients use.

    The region is ``region``, else boto3's (``AWS_DEFAULT_REGION``, the profile), else
    ``us-east-1`` for a local ``endpoint_url`` (moto signs with one too).
    """
    if endpoint_url is not None and not re.match(r"https?://[^/]", endpoint_url):
        raise ConfigurationError(
            f"{service} endpoint_url must be an http:// or https:// URL, got {endpoint_url!r}"
        )
    if region is not None and not _REGION.fullmatch(region):
        raise ConfigurationError(
            f"{service} region {region!r} is not an AWS region name: use one such as "
            "eu-west-1 or us-east-1 (lower-case letters, digits and '-')"
        )
    if (aws_access_key_id is None) != (aws_secret_access_key is None):
        raise ConfigurationError(
            f"{service} credentials need both an access key id and a secret access key"
        )
    try:
        session = boto3.session.Session(
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            region_name=region,
            profile_name=profile,
        )
    except BotoCoreError as exc:  # an unknown profile
        raise ConfigurationError(f"cannot set up the {service} client: {exc}") from exc
    # Typed str, but None when no region is configured anywhere.
    region = region or cast("str | None", session.region_name)
    if region is None:
        if endpoint_url is None:
            scheme = service.lower()
            raise ConfigurationError(
                f"{service} needs a region: pass region=..., add ?region=... to the "
                f"{scheme}:// URL, or set AWS_DEFAULT_REGION"
            )
        region = "us-east-1"  # a local endpoint (moto, LocalStack) still signs with one
    return session, region


def client_config(*, concurrency: int, connect_timeout: float, read_timeout: float) -> Config:
    """The botocore configuration of a transport's clients: two attempts per call, so an
    unreachable endpoint fails in seconds, and a connection per call in flight."""
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 2, "mode": "standard"},
        max_pool_connections=concurrency + 2,
        parameter_validation=False,  # entries are built by the transports, already valid
    )


@dataclass(frozen=True)
class ClientOptions:
    """The keywords both AWS transports take for their boto3 clients (SNS passes them on
    to the SQS transport of its queues): where, as whom, calls at once, timeouts."""

    region: str | None
    endpoint_url: str | None
    concurrency: int
    connect_timeout: float
    read_timeout: float
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    aws_session_token: str | None
    profile: str | None

    def keywords(self) -> dict[str, Any]:
        """These options as a transport constructor's keyword arguments."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def clients(self, service: str, *read_timeouts: float) -> tuple[str, list[Any]]:
        """The region, and a client of ``service`` (``SQS``, ``SNS``) for each of
        ``read_timeouts`` (by default one, with ``read_timeout``), from one session."""
        session, region = open_session(
            service,
            region=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            profile=self.profile,
        )
        clients = []
        for read_timeout in read_timeouts or (self.read_timeout,):
            config = client_config(
                concurrency=self.concurrency,
                connect_timeout=self.connect_timeout,
                read_timeout=read_timeout,
            )
            clients.append(
                session.client(
                    service.lower(),  # type: ignore[call-overload]
                    region_name=region,
                    endpoint_url=self.endpoint_url,
                    config=config,
                )
            )
        return region, clients


def describe(
    system: str, service: str, region: str, endpoint_url: str | None
) -> TransportDescription:
    """The transport's description for traces and metrics: ``system`` (``aws_sqs``,
    ``aws_sns``), the region, and the server (the endpoint, or ``service.region`` at AWS)."""
    attributes: dict[str, Any] = {"cloud.region": region}
    server = urlsplit(endpoint_url) if endpoint_url else None
    if server is not None and server.hostname:
        attributes["server.address"] = server.hostname
        if server.port:
            attributes["server.port"] = server.port
    else:
        attributes["server.address"] = f"{service}.{region}.amazonaws.com"
    return TransportDescription(system, attributes)
