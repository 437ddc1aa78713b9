"""Pieces shared by the CLI commands: options, settings from the environment, engines.

Where a value may come from the environment (docs/operations.md has the table):

* ``--db`` and ``--broker`` from ``OUTBOXER_DB`` / ``OUTBOXER_BROKER``, shared by every
  command (:func:`db_option`, :func:`broker_option`);
* a command's other settings from variables scoped to that command, named after the
  command's path and the option (:func:`outboxer.cli.shell.equip`): ``outboxer relay
  --batch-size`` from
  ``OUTBOXER_RELAY_BATCH_SIZE``, ``outboxer inbox prune --batch-size`` from
  ``OUTBOXER_INBOX_PRUNE_BATCH_SIZE``, ``outboxer-inbox --concurrency`` from
  ``OUTBOXER_INBOX_CONCURRENCY`` (:func:`setting`; ``--help`` shows each name);
* confirmations, filters and output choices from no variable at all (:func:`option`): a
  variable left set for one command must never change what another one deletes or shows.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import click
from rich.console import Console
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import NoSuchModuleError

from ..checks import LIMIT_TEXT, MAX_DURATION
from ..diagnosis import diagnose
from ..errors import InvalidURL, OperatorError
from ..secrets import mask_url
from ..sync_urls import sync_url

F = TypeVar("F", bound=Callable[..., Any])

ENV_PREFIX = "OUTBOXER"
"""The variables of ``outboxer COMMAND --option`` are ``OUTBOXER_COMMAND_OPTION``."""
INBOX_ENV_PREFIX = "OUTBOXER_INBOX"
"""The variables of ``outboxer-inbox --option`` are ``OUTBOXER_INBOX_OPTION``."""

# soft_wrap: messages are never broken across lines (they are read by scripts and tests).
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

if TYPE_CHECKING:  # click < 8.2 has no generic ParamType at run time
    _FloatType = click.ParamType[float]
    _TimeType = click.ParamType[datetime]
else:
    _FloatType = _TimeType = click.ParamType


def option(*param_decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option read from the command line only (filters, confirmations, output)."""
    attrs.setdefault("allow_from_autoenv", False)
    return click.option(*param_decls, **attrs)


def setting(*param_decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option that may also come from the command's own ``OUTBOXER_<COMMAND>_<NAME>``
    variable (named by :func:`outboxer.cli.shell.equip`, shown in ``--help``)."""
    attrs.setdefault("allow_from_autoenv", True)
    attrs.setdefault("show_envvar", True)
    return click.option(*param_decls, **attrs)


def db_option(required: bool = True) -> Callable[[F], F]:
    return click.option(
        "--db",
        "db_url",
        required=required,
        metavar="URL",
        envvar="OUTBOXER_DB",
        show_envvar=True,
        help="SQLAlchemy database URL, e.g. postgresql+psycopg://user@host/db. Pass a "
        "password through OUTBOXER_DB, not the command line (ps shows arguments).",
    )


def _stripped(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # A secret file's trailing newline, a pasted space: never part of a URL (as --db).
    return value.strip() if isinstance(value, str) else value


BROKERS_HELP = "amqp://..., sqs://?region=..., sns://?region=..."


def broker_option(
    memory: str = "memory:// (this process's own broker: only what this process sends)",
) -> Callable[[F], F]:
    """``--broker`` (``OUTBOXER_BROKER``), stripped of surrounding spaces; ``memory`` is what
    the command's help says of ``memory://``."""
    return click.option(
        "--broker",
        "broker_url",
        required=True,
        metavar="URL",
        envvar="OUTBOXER_BROKER",
        show_envvar=True,
        callback=_stripped,
        help=f"{BROKERS_HELP}; {memory}. Pass credentials through OUTBOXER_BROKER (or "
        "AWS_* variables), not the command line.",
    )


def in_process_broker(url: str) -> bool:
    """Whether ``url`` names the in-process broker (``memory://``) without
    ``?discard=true`` (what a relay sends to it is lost with its process, and says so)."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "memory":
        return False
    discard = parse_qs(parts.query).get("discard", [""])[-1].lower()
    return discard not in ("1", "true", "yes")


def running_as_command() -> bool:
    """Whether this process is an outboxer command (the ``outboxer`` or ``outboxer-inbox``
    script), not a program that called its click command (a test, ``CliRunner``), which
    shares its in-process broker with the command."""
    return Path(sys.argv[0]).stem.removesuffix("-script") in ("outboxer", "outboxer-inbox")


def import_target(target: str, param_hint: str, example: str) -> Any:
    """Import ``package.module:attribute`` (``attribute`` may be dotted, ``obj.attr``) and
    return the attribute; click's BadParameter, naming ``param_hint``, when it is not of
    that form, the module cannot be imported or has no such attribute."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(
            f"{target!r} is not PACKAGE.MODULE:ATTRIBUTE (for example {example})",
            param_hint=param_hint,
        )
    # The current directory goes last: the application's module is found there, but a
    # stray file (a pika.py, a json.py) never replaces an installed package.
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path and "." not in sys.path:
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        # A database the module reaches at import is the operator's to fix (exit 4, 5, 6);
        # anything else (ImportError, SyntaxError, a RuntimeError of the module) is the
        # target's, named in one line.
        if isinstance(exc, OperatorError) or diagnose(exc) is not None:
            raise
        raise click.BadParameter(
            f"cannot import {module_name!r} (from {target}): {failure(exc)}"
            f"{_missing_driver(exc)}{_shadowed(module_name, here)}",
            param_hint=param_hint,
        ) from exc
    found: Any = module
    walked: list[str] = []
    for part in attribute.split("."):
        if not hasattr(found, part):
            where = f"{module_name}:{'.'.join(walked)}" if walked else f"module {module_name!r}"
            raise click.BadParameter(
                f"{where} has no attribute {part!r} (from {target}){_shadowed(module_name, here)}",
                param_hint=param_hint,
            )
        found = getattr(found, part)
        walked.append(part)
    return found


def _shadowed(module_name: str, here: str) -> str:
    """``; <why>`` when the top package of ``module_name`` was imported from elsewhere than
    the working directory, which holds a module of that name (``sched.py``, ``email/``):
    the working directory comes last on sys.path, so the standard library's or an
    installed package of that name wins. Else nothing."""
    top = module_name.partition(".")[0]
    local = next(
        (p for p in (Path(here) / f"{top}.py", Path(here) / top) if p.exists()),
        None,
    )
    imported = sys.modules.get(top)
    if local is None or imported is None:
        return ""
    file = getattr(imported, "__file__", None)
    if file is not None and Path(file).resolve().is_relative_to(Path(here).resolve()):
        return ""  # it is the working directory's own
    origin = file or "Python's built-in module"
    return (
        f"; the {top!r} imported is {origin}, not {local} (the working directory comes last "
        f"on sys.path, after the standard library and installed packages): rename your module"
    )


def failure(exc: BaseException) -> str:
    """``exc`` in one line: its class and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def make_engine(url: str, factory: Callable[..., Engine] = create_engine, **kwargs: Any) -> Engine:
    """An engine for ``url``, or :class:`~outboxer.errors.InvalidURL` naming what is wrong
    with it (the URL masked). Whitespace around it is dropped; an asyncio driver
    (``postgresql+psycopg_async``, ``+asyncpg``, ``sqlite+aiosqlite``, ``mysql+asyncmy``,
    ``+aiomysql``) is replaced by the database's synchronous one (psycopg, sqlite3, PyMySQL),
    with asyncpg's query settings in libpq's words (``ssl`` is ``sslmode``).

    Its errors never carry bound parameters (``hide_parameters``): row values would
    otherwise reach logs and dead letters.
    """
    kwargs.setdefault("hide_parameters", True)
    url = url.strip()  # a secret file's trailing newline, a pasted space: never part of a URL
    try:
        parsed = make_url(url)
    except Exception as exc:  # ArgumentError, ValueError on a bad port...
        raise InvalidURL(
            f"not a database URL: {mask_url(url)}; use dialect+driver://user@host:port/db "
            "(percent-encode '/', '#', '@' and '?' in a password)"
        ) from exc
    if parsed.host and "@" in parsed.host:
        # SQLAlchemy ends the password at its first '@': the rest of it became the host,
        # which the driver would print ("failed to resolve host 'tSECRET@db'"). An '@' in
        # the query (?application_name=ops@billing) is not in the host, and is fine.
        raise InvalidURL(
            f"invalid database URL {mask_url(url)}: percent-encode '@' in the user name and "
            "password (%40)"
        )
    # An asyncio application's URL, reused: the commands are synchronous, so they take the
    # same database through its synchronous driver.
    try:
        parsed = sync_url(parsed)
    except NoSuchModuleError as exc:  # postgres://, a typo, a dialect not installed
        raise InvalidURL(_unknown_dialect(parsed.drivername, mask_url(url))) from exc
    try:
        return factory(parsed.render_as_string(hide_password=False), **kwargs)
    except NoSuchModuleError as exc:
        raise InvalidURL(_unknown_dialect(parsed.drivername, mask_url(url))) from exc
    except Exception as exc:  # missing driver, bad option: say which
        reason = str(exc)
        if parsed.password:
            reason = reason.replace(str(parsed.password), "***")
        fix = _driver_fix(exc, parsed.drivername)
        raise InvalidURL(f"cannot use {mask_url(url)}: {reason}{fix}") from exc


_POSTGRESQL = "postgresql+psycopg://user@host:5432/db"
_DRIVER_FIXES = {
    # the module a driver imports: how to get it, or the driver outboxer installs instead
    "psycopg": "pip install 'outboxer[postgresql]'",
    "pymysql": "pip install 'outboxer[mysql]'",
    "psycopg2": f"pip install psycopg2, or use psycopg 3: {_POSTGRESQL} with pip install "
    "'outboxer[postgresql]'",
    "MySQLdb": "pip install mysqlclient, or use PyMySQL: mysql+pymysql://user@host:3306/db "
    "with pip install 'outboxer[mysql]'",
}


def _missing_driver(exc: BaseException) -> str:
    """``; <fix>`` when ``exc`` (or what caused it) is a database driver outboxer knows
    that is not installed (the application's engine, made at import), else nothing."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ImportError):
            fix = _DRIVER_FIXES.get((current.name or "").partition(".")[0])
            if fix is not None:
                return f"; {fix}"
        current = current.__cause__ or current.__context__
    return ""


def _unknown_dialect(drivername: str, shown: str) -> str:
    """The one line for a URL whose ``dialect+driver`` SQLAlchemy does not know."""
    dialect = drivername.partition("+")[0]
    if dialect in ("postgres", "pgsql", "psql"):  # Heroku's and many PaaS' DATABASE_URL
        use = f"write it as {_POSTGRESQL}"
    else:
        use = (
            "use postgresql+psycopg://, mysql+pymysql:// or sqlite:///PATH (or install the "
            "package of that SQLAlchemy dialect)"
        )
    return f"SQLAlchemy has no database dialect {drivername!r} (in {shown}): {use}"


def _driver_fix(exc: Exception, drivername: str) -> str:
    """``; <fix>`` when ``exc`` is a driver that is not installed, else nothing."""
    if not isinstance(exc, ImportError):
        return ""
    missing = (exc.name or "").partition(".")[0]
    fix = _DRIVER_FIXES.get(missing)
    if fix is None:
        return f"; install the driver of {drivername!r}"
    return f"; {fix}"


def safe_url(url: str) -> str:
    """``url`` with every secret masked, for logs and messages."""
    return mask_url(url)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> float:
    """Seconds in ``value``: ``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w``; a finite
    number from 0 to :data:`MAX_DURATION` (``nan`` would compare false with every lag,
    ``inf`` or ``1e12`` would overflow the date arithmetic they feed)."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a duration; use seconds or a number with s, m, h, d or w (7d)"
        ) from None
    if math.isnan(seconds) or math.isinf(seconds):
        raise click.BadParameter(f"{value!r} is not a finite duration; use seconds or 7d, 2w...")
    if seconds < 0:
        raise click.BadParameter(f"{value!r}: a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise click.BadParameter(f"{value!r}: a duration is at most 100 years (36500d)")
    return seconds


class Duration(_FloatType):
    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            return parse_duration(str(value))
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


class When(_TimeType):
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
            except click.BadParameter as exc:
                if "is not a duration" not in exc.message:  # a duration, but an impossible one
                    self.fail(exc.message, param, ctx)
                self.fail(
                    f"{value!r} is neither an ISO 8601 time (2026-11-22T10:00) nor a duration "
                    "ago (2h, 7d)",
                    param,
                    ctx,
                )
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Seconds(click.FloatRange):
    """A duration in seconds, from ``minimum`` to :data:`MAX_DURATION`: a finite number
    (click's FloatRange lets ``nan`` and ``inf`` through, and ``1e13`` overflows the waits
    and date arithmetic it feeds)."""

    name = "seconds"

    def __init__(self, minimum: float) -> None:
        super().__init__(min=minimum)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number) or math.isinf(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if number > MAX_DURATION:
            self.fail(
                f"{value!r} is more than {LIMIT_TEXT}, past what a date holds; use a shorter "
                "duration",
                param,
                ctx,
            )
        return number
