"""``outboxer dead-letter list|show|replay|replay-all|delete|purge``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import sessionmaker

from ..dead_letters import DeadLetter, DeadLetters, replay_envelope
from ..errors import DeadLetterNotFound, OutboxerError
from ..handler_address import address_problem
from ..plan import plural
from .common import When, console, db_option, err_console, make_engine, option

F = TypeVar("F", bound=Callable[..., Any])


def filters(fn: F) -> F:
    """The filter options shared by list, replay-all and purge."""
    options = [
        option(
            "--origin", type=click.Choice(["relay", "handler", "consumer"]), help="Where it failed."
        ),
        option("--consumer", help="Consumer name."),
        option("--handler", help="Handler name."),
        option("--type", "message_type", help="Message type."),
        option("--error-type", help="Error type (exception class, unroutable...)."),
        option("--since", type=When(), help="Failed at or after: ISO time or a duration ago (2h)."),
        option("--until", type=When(), help="Failed before: ISO time or a duration ago."),
    ]
    for add in reversed(options):
        fn = add(fn)
    return fn


def _dead_letters(db_url: str) -> DeadLetters:
    engine = make_engine(db_url)
    return DeadLetters(sessionmaker(engine))


def _filters(**values: Any) -> dict[str, Any]:
    keys = ("origin", "consumer", "handler", "message_type", "error_type", "since", "until")
    return {k: values[k] for k in keys}


@click.group("dead-letter")
def dead_letter() -> None:
    """Inspect, replay and delete dead letters."""


@dead_letter.command("list")
@db_option()
@filters
@option("--all", "include_replayed", is_flag=True, help="Include replayed ones kept as history.")
@option("--limit", default=50, type=click.IntRange(1, 10_000), help="Rows per page.")
@option("--before", "before_id", type=int, help="Show ids below this one (next page).")
@option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_(
    db_url: str,
    include_replayed: bool,
    limit: int,
    before_id: int | None,
    as_json: bool,
    **values: Any,
) -> None:
    """List dead letters, newest first."""
    letters = _dead_letters(db_url).list(
        **_filters(**values), include_replayed=include_replayed, limit=limit, before_id=before_id
    )
    if as_json:
        for letter in letters:
            click.echo(json.dumps(_summary(letter)))
        return
    if not letters:
        console.print("no dead letters match")
        return
    table = Table(title=f"dead letters ({len(letters)} shown, newest first)")
    for column in (
        "id",
        "origin",
        "consumer:handler / destination",
        "type",
        "error",
        "attempts",
        "last failed",
    ):
        table.add_column(column, overflow="fold")
    for letter in letters:
        where = _target(letter)
        error = Text.assemble(
            (_clean(letter.error_type), "bold"), ": ", _clean(_shorten(letter.error_message, 80))
        )
        if letter.replayed_at:
            error.append(" (replayed)", style="dim")
        table.add_row(
            str(letter.id),
            _text(letter.origin),
            _text(where),
            _text(letter.message_type or "?"),
            error,
            str(letter.attempts),
            _time(letter.last_failed_at),
        )
    console.print(table)
    if len(letters) == limit:
        console.print(f"more: --before {letters[-1].id}")


@dead_letter.command()
@db_option()
@click.argument("dead_letter_id", type=int)
def show(db_url: str, dead_letter_id: int) -> None:
    """Show one dead letter in full: envelope, payload, error and traceback."""
    letter = _get(_dead_letters(db_url), dead_letter_id)
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    for name, value in (
        ("origin", letter.origin),
        ("message id", letter.message_id),
        ("type", letter.message_type),
        ("destination", letter.destination),
        ("key", letter.message_key),
        ("consumer", letter.consumer),
        ("handler", letter.handler),
        ("correlation id", letter.correlation_id),
        ("causation id", letter.causation_id),
        ("trace id", _trace_id(letter.traceparent)),
        ("traceparent", letter.traceparent),
        ("occurred at", letter.occurred_at and _time(letter.occurred_at)),
        ("attempts", letter.attempts),
        ("first failed", _time(letter.first_failed_at)),
        ("last failed", _time(letter.last_failed_at)),
        ("replayed", letter.replayed_at and _time(letter.replayed_at)),
        ("headers", json.dumps(letter.headers) if letter.headers else None),
        ("error", f"{letter.error_type}: {letter.error_message}"),
    ):
        if value not in (None, ""):
            fields.add_row(name, _text(str(value)))
    # soft_wrap=False: the console's soft wrap (one line per message, for scripts) would cut
    # every line at the panel's edge, the traceback's file names and line numbers with it.
    console.print(Panel(fields, title=f"dead letter {letter.id}"), soft_wrap=False)
    console.print(Panel(_payload(letter.payload), title="payload"), soft_wrap=False)
    if letter.traceback:
        traceback = _text(letter.traceback.rstrip(), keep_lines=True)
        console.print(Panel(traceback, title="traceback"), soft_wrap=False)


def _address(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    problem = None if value is None else address_problem(value)
    if problem is not None:
        raise click.BadParameter(problem)
    return value


def to_handler_option(help: str) -> Callable[[F], F]:
    return option("--to-handler", metavar="CONSUMER:HANDLER", callback=_address, help=help)


@dead_letter.command()
@db_option()
@click.argument("dead_letter_id", type=int)
@option(
    "--keep", is_flag=True, help="Keep it as history (hidden from list) instead of deleting it."
)
@to_handler_option(
    "Send it to this handler alone (consumer:handler, as list shows it), e.g. to the new "
    "name of a handler that was renamed."
)
def replay(db_url: str, dead_letter_id: int, keep: bool, to_handler: str | None) -> None:
    """Send one dead letter again: to its handler alone, or to its destination.

    A letter for a handler the consumer no longer has (renamed, retired) goes back to that
    handler, and comes back as unknown_handler while it is missing: --to-handler sends it
    to the handler that does its work now.
    """
    dead = _dead_letters(db_url)
    letter = _get(dead, dead_letter_id)
    try:
        message_id = dead.replay(dead_letter_id, keep=keep, to_handler=to_handler)
    except OutboxerError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(
        _text(
            f"replayed dead letter {dead_letter_id} (message {message_id}) to "
            f"{_replay_target(letter, to_handler)}"
        )
    )


def _replay_target(letter: DeadLetter, to_handler: str | None) -> str:
    """Where a replay of ``letter`` went: a handler, or a destination."""
    try:
        envelope = replay_envelope(letter, to_handler)
    except OutboxerError:  # edited since it was read: the replay itself judged it
        where = letter.consumer or letter.destination or "?"
        return f"handler {to_handler}" if to_handler else where
    return f"handler {envelope.handler}" if envelope.handler else envelope.destination


@dead_letter.command("replay-all")
@db_option()
@filters
@option("--keep", is_flag=True, help="Keep them as history instead of deleting them.")
@to_handler_option(
    "Send each to this handler alone (consumer:handler); needs --consumer and --handler, "
    "whose handler they were for."
)
@option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def replay_all(db_url: str, keep: bool, to_handler: str | None, yes: bool, **values: Any) -> None:
    """Replay every dead letter matching the filters.

    With --to-handler consumer:handler, the letters of the --consumer's --handler given
    go to that handler instead (a handler that was renamed). Exits 1 if some could not be replayed
    as stored (each is named, with why).
    """
    if to_handler is not None and (values["consumer"] is None or values["handler"] is None):
        raise click.UsageError(
            "--to-handler needs --consumer and --handler (whose handler the letters were "
            "for), so that other handlers' letters, another consumer's of the same name "
            "included, are not re-addressed with them"
        )
    dead = _dead_letters(db_url)
    chosen = _filters(**values)
    # What matches now, and nothing newer: the replays that fail again while this runs,
    # or letters written after the count, wait for the next replay-all.
    up_to_id = _newest(dead, chosen, include_replayed=False)
    total = dead.matching(**chosen, up_to_id=up_to_id) if up_to_id else 0
    if not total:
        console.print("no dead letters match")
        return
    if not yes:
        where = f" to handler {_clean(to_handler)}" if to_handler else ""
        click.confirm(
            f"replay {total} dead letter{'s' * (total != 1)}{where}?", abort=True, err=True
        )
    skipped: list[str] = []  # the first few reasons (memory stays bounded), and a count
    left = 0

    def skip(_id: int, why: str) -> None:
        nonlocal left
        left += 1
        if len(skipped) < _SHOWN_SKIPPED:
            skipped.append(why)

    with _progress() as progress:
        task = progress.add_task("replaying", total=total)
        replayed = dead.replay_all(
            **chosen,
            keep=keep,
            progress=lambda n: progress.advance(task, n),
            skipped=skip,
            up_to_id=up_to_id,
            to_handler=to_handler,
        )
    console.print(f"replayed {replayed} of {plural(total, 'dead letter')}")
    for why in skipped:
        err_console.print(_text(f"not replayed: {_shorten(why, 500)}"))
    if left > len(skipped):
        err_console.print(
            f"and {left - len(skipped)} more not replayed; 'outboxer dead-letter list' shows them"
        )
    if left:
        raise click.exceptions.Exit(1)


_SHOWN_SKIPPED = 20
"""replay-all names this many letters it left, and counts the others."""


def _newest(dead: DeadLetters, chosen: dict[str, Any], *, include_replayed: bool) -> int:
    newest = dead.list(**chosen, include_replayed=include_replayed, limit=1)
    return newest[0].id if newest else 0


@dead_letter.command()
@db_option()
@click.argument("dead_letter_id", type=int)
def delete(db_url: str, dead_letter_id: int) -> None:
    """Delete one dead letter."""
    try:
        _dead_letters(db_url).delete(dead_letter_id)
    except DeadLetterNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"deleted dead letter {dead_letter_id}")


@dead_letter.command()
@db_option()
@filters
@option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge(db_url: str, yes: bool, **values: Any) -> None:
    """Delete every dead letter matching the filters (replayed history included)."""
    dead = _dead_letters(db_url)
    chosen = _filters(**values)
    up_to_id = _newest(dead, chosen, include_replayed=True)  # not what arrives meanwhile
    total = dead.matching(**chosen, include_replayed=True, up_to_id=up_to_id) if up_to_id else 0
    if not total:
        console.print("no dead letters match")
        return
    if not yes:
        click.confirm(
            f"delete {total} dead letter{'s' * (total != 1)} for good?", abort=True, err=True
        )
    with _progress() as progress:
        task = progress.add_task("deleting", total=total)
        deleted = dead.purge(
            **chosen, progress=lambda n: progress.advance(task, n), up_to_id=up_to_id
        )
    console.print(f"deleted {plural(deleted, 'dead letter')}")


def _get(dead: DeadLetters, dead_letter_id: int) -> DeadLetter:
    try:
        return dead.get(dead_letter_id)
    except DeadLetterNotFound as exc:
        raise click.ClickException(str(exc)) from exc


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )


def _payload(payload: bytes) -> Any:
    try:
        # ASCII JSON: control characters in strings are shown as escapes, never sent.
        return Syntax(json.dumps(json.loads(payload), indent=2), "json", word_wrap=True)
    except (ValueError, RecursionError):
        return Text(repr(payload[:2000]))


def _clean(text: str, keep_lines: bool = False) -> str:
    """``text`` without control characters (escape sequences, bells, carriage returns):
    message text comes from outside and must not drive the operator's terminal."""
    kept = "\n\t" if keep_lines else ""
    return "".join(
        c if c.isprintable() or c in kept else f"\\x{ord(c):02x}" if ord(c) < 256 else "?"
        for c in text
    )


def _text(text: str, keep_lines: bool = False) -> Text:
    """Message text for Rich, taken literally (no markup) and cleaned of control characters."""
    return Text(_clean(text, keep_lines))


def _summary(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "origin": letter.origin,
        "message_id": str(letter.message_id) if letter.message_id else None,
        "type": letter.message_type,
        "destination": letter.destination,
        "consumer": letter.consumer,
        "handler": letter.handler,
        "error_type": letter.error_type,
        "error": letter.error_message,
        "attempts": letter.attempts,
        "first_failed_at": letter.first_failed_at.isoformat(),
        "last_failed_at": letter.last_failed_at.isoformat(),
        "replayed_at": letter.replayed_at.isoformat() if letter.replayed_at else None,
    }


def _target(letter: DeadLetter) -> str:
    """consumer:handler, or the destination. The relay parks a retry it could not send with
    the envelope's handler (already consumer:handler) and no consumer."""
    if not letter.handler:
        return letter.destination or ""
    return f"{letter.consumer}:{letter.handler}" if letter.consumer else letter.handler


def _shorten(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _time(moment: datetime) -> str:
    return moment.isoformat(sep=" ", timespec="seconds")


def _trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (what Jaeger's search box takes)."""
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None
