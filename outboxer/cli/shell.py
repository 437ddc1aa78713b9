"""What every outboxer command shares around its own work.

:func:`equip` walks a command tree and gives every command, in the same place:

* ``--log-level`` and ``--log-format text|json`` (:mod:`outboxer.cli.logs`), from the
  command's own variables too (``OUTBOXER_RELAY_LOG_LEVEL``...);
* one line and a distinct exit code for every expected operator failure (database or
  broker unreachable or refusing credentials, outboxer tables missing, invalid URL), as
  :func:`outboxer.diagnosis.diagnose` names it; the traceback only at ``--log-level
  debug``. Anything else is a bug, and keeps Python's traceback.

Exit codes (also in docs/operations.md): 0 done; 1 failed (a command's own failure, or an
unexpected error); 2 usage error; 3 invalid URL or configuration; 4 database unreachable;
5 database refused the credentials (or privileges); 6 outboxer tables missing; 7 broker unreachable;
8 broker refused the credentials; 9 ``status --max-lag`` exceeded; 130 forced exit
(a second Ctrl-C).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import click

from ..diagnosis import diagnose
from ..errors import ConfigurationError, OperatorError
from . import logs

__all__ = ["EXIT_CODES", "LAG_EXCEEDED", "FORCED_EXIT", "configure_logging_later", "equip"]

LAG_EXCEEDED = 9
FORCED_EXIT = 130
EXIT_CODES = {
    0: "done",
    1: "failed: the command's own failure, or an unexpected error (a traceback follows)",
    2: "usage error: an unknown option, a bad value",
    3: "invalid URL or configuration",
    4: "database unreachable (refused, timed out, unknown host, no such database)",
    5: "the database refused the credentials, or the user lacks privileges",
    6: "the outboxer tables are missing: run outboxer db upgrade",
    7: "broker unreachable",
    8: "the broker refused the credentials",
    LAG_EXCEEDED: "outboxer status --max-lag: the oldest due message waited longer",
    FORCED_EXIT: "a second Ctrl-C (SIGINT) forced the exit",
}
_EQUIPPED = "outboxer_equipped"
_PREFIX = "outboxer_env_prefix"
ENV_ROOT = "OUTBOXER"
_DEFER = "outboxer_defer_logging"

log = logging.getLogger("outboxer.cli")


def _log_options() -> list[click.Option]:
    return [
        click.Option(
            ["--log-level"],
            type=click.Choice(logs.LEVELS, case_sensitive=False),
            default=None,
            show_envvar=True,
            help="Logging verbosity [default: INFO]; debug also prints tracebacks.",
        ),
        click.Option(
            ["--log-format"],
            type=click.Choice(logs.FORMATS, case_sensitive=False),
            default="text",
            show_envvar=True,
            show_default=True,
            help="text: one line per record; json: one JSON object per line.",
        ),
    ]


def configure_logging_later(command: click.Command) -> click.Command:
    """Mark ``command`` as configuring logging itself, by calling :func:`configure_logging`
    (outboxer-inbox does, after importing the application, whose logging comes first)."""
    setattr(command, _DEFER, True)
    return command


def configure_logging() -> None:
    """Apply the current command's ``--log-level``/``--log-format`` now."""
    ctx = click.get_current_context()
    logs.configure(*ctx.meta.get("outboxer.logging", (None, "text")))
    warn_about_variables(ctx)


LIBRARY_VARIABLES = frozenset({"OUTBOXER_TRACING", "OUTBOXER_MESSAGING_SYSTEM"})
"""Variables the library reads itself (docs/tracing.md), whatever the command."""


def _variables_of(command: click.Command) -> set[str]:
    names: set[str] = set()
    commands = [command]
    while commands:
        current = commands.pop()
        if isinstance(current, click.Group):
            commands.extend(current.commands.values())
        for param in current.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
    return names


def known_variables() -> set[str]:
    """Every variable an outboxer command (``outboxer ...`` and ``outboxer-inbox``) or the
    library reads."""
    from . import main as outboxer_main
    from .inbox import main as inbox_main

    return _variables_of(outboxer_main) | _variables_of(inbox_main) | set(LIBRARY_VARIABLES)


def warn_about_variables(ctx: click.Context) -> None:
    """One warning per variable meant for this command that no command reads: one under
    its prefix that names no option (a typo: OUTBOXER_RELAY_HEALTHPORT), or an option's
    name without the command's scope (OUTBOXER_BATCH_SIZE, as releases before the scoped
    variables read). Such a variable used to be ignored without a word."""
    prefix = getattr(ctx.command, _PREFIX, None)
    if prefix is None:
        return
    settings = {
        f"{ENV_ROOT}_{(param.name or '').upper()}": param
        for param in ctx.command.params
        if isinstance(param, click.Option) and param.allow_from_autoenv and param.envvar
    }
    own = [p.envvar for p in settings.values() if isinstance(p.envvar, str)]
    known: set[str] | None = None
    for variable in sorted(os.environ):
        scoped = variable.startswith(f"{prefix}_")
        if not scoped and variable not in settings:
            continue
        if known is None:
            known = known_variables()
        if variable in known:
            continue
        param = settings.get(variable)
        if not scoped and param is not None:
            log.warning(
                "%s is not read: %s takes --%s from %s",
                variable,
                ctx.command_path,
                (param.name or "").replace("_", "-"),
                param.envvar,
            )
            continue
        close = difflib.get_close_matches(variable, own, n=1)
        log.warning(
            "%s is not read by %s: no option has that name%s (--help lists its variables)",
            variable,
            ctx.command_path,
            f"; did you mean {close[0]}?" if close else "",
        )


def equip(command: click.Command, prefix: str = "OUTBOXER") -> None:
    """Give ``command`` and its subcommands the shared options and failure handling, and
    name the variable of each setting after the command: ``OUTBOXER_RELAY_BATCH_SIZE``
    (``prefix``, the command's path, the option's name)."""
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            equip(sub, f"{prefix}_{name.upper().replace('-', '_')}")
        return
    if getattr(command, _EQUIPPED, False) or command.callback is None:
        return
    setattr(command, _EQUIPPED, True)
    setattr(command, _PREFIX, prefix)
    command.params.extend(_log_options())
    for param in command.params:
        # Settings (common.setting and the log options) read their command's variable;
        # filters, confirmations and output choices (common.option) read none.
        if isinstance(param, click.Option) and param.allow_from_autoenv and not param.envvar:
            param.envvar = f"{prefix}_{(param.name or '').upper()}"
    command.callback = _wrap(command.callback, defer=getattr(command, _DEFER, False))


def _wrap(callback: Callable[..., Any], *, defer: bool) -> Callable[..., Any]:
    @functools.wraps(callback)
    def run(*args: Any, log_level: str | None, log_format: str, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.meta["outboxer.logging"] = (log_level, log_format.lower())
        if not defer:
            logs.configure(log_level, log_format.lower())
            warn_about_variables(ctx)
        debug = (log_level or "").upper() == "DEBUG"
        try:
            return callback(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            problem = diagnose(
                exc, db_url=kwargs.get("db_url"), broker_url=kwargs.get("broker_url")
            )
            if problem is None and isinstance(exc, ConfigurationError):
                problem = exc_as_operator_error(exc)
            if problem is None:
                raise
            if debug:
                log.debug("the traceback of the failure below", exc_info=exc)
            if log_format.lower() == "json":  # stderr stays one JSON object per line
                log.error("%s", _one_line(str(problem)))
            else:
                click.echo(f"Error: {_one_line(str(problem))}", err=True)
            ctx.exit(problem.exit_code)

    return run


def exc_as_operator_error(exc: ConfigurationError) -> OperatorError:
    """A configuration error found at start-up exits with the configuration code (3)."""
    problem = OperatorError(str(exc))
    problem.exit_code = 3
    problem.__cause__ = exc
    return problem


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
