"""Pieces shared by the CLI commands: options that read OUTBOXER_* variables, engines."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import click
from rich.console import Console
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

F = TypeVar("F", bound=Callable[..., Any])

# soft_wrap: messages are never broken across lines (they are read by scripts and tests).
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def option(*param_decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option whose value can also come from ``OUTBOXER_<LONG_NAME>``."""
    long_name = next(d for d in param_decls if d.startswith("--"))
    flag = long_name[2:].split("/")[0]
    attrs.setdefault("envvar", "OUTBOXER_" + flag.upper().replace("-", "_"))
    attrs.setdefault("show_envvar", True)
    return click.option(*param_decls, **attrs)


def db_option(required: bool = True) -> Callable[[F], F]:
    return option(
        "--db",
        "db_url",
        required=required,
        metavar="URL",
        help="SQLAlchemy database URL, e.g. postgresql+psycopg://user@host/db.",
    )


def make_engine(url: str, factory: Callable[..., Engine] = create_engine, **kwargs: Any) -> Engine:
    """An engine for ``url``, or a clear CLI error naming what is wrong with it.

    Its errors never carry bound parameters (``hide_parameters``): row values would
    otherwise reach logs and dead letters.
    """
    kwargs.setdefault("hide_parameters", True)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise click.BadParameter(f"not a database URL: {exc}", param_hint="--db") from exc
    try:
        return factory(parsed.render_as_string(hide_password=False), **kwargs)
    except Exception as exc:  # missing driver, bad option: say which
        raise click.BadParameter(
            f"cannot use {parsed.render_as_string(hide_password=True)}: {exc}", param_hint="--db"
        ) from exc


def safe_url(url: str) -> str:
    """``url`` with any password masked, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> float:
    """Seconds in ``value``: ``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a duration; use seconds or a number with s, m, h, d or w (7d)"
        ) from None
    if seconds < 0:
        raise click.BadParameter(f"{value!r}: a duration cannot be negative")
    return seconds


class Duration(click.ParamType[float]):
    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


class When(click.ParamType[datetime]):
    """A point in time: ISO 8601 (UTC if no zone), or a duration ago (``2h``)."""

    name = "TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            try:
                return datetime.now(timezone.utc) - timedelta(seconds=parse_duration(text))
            except click.BadParameter:
                self.fail(
                    f"{value!r} is neither an ISO 8601 time (2026-11-22T10:00) nor a duration "
                    "ago (2h, 7d)",
                    param,
                    ctx,
                )
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level.upper() != "DEBUG":
        # pika logs several ERROR lines per failed connection attempt; outboxer already
        # reports an outage once, with what it does about it.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
