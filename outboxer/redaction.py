"""Error text without row values: what a dead letter, a span and a log line may say.

SQLAlchemy puts a statement's bound parameters in its error text (``[parameters: ...]``)
and PostgreSQL adds the failing row (``DETAIL: Failing row contains (...)``), so a
handler's database error would copy personal data (an e-mail address, a name) into the
dead-letter table, the trace and the logs. :func:`redact` turns both off on an exception
and its causes before anything reads them. Engines outboxer creates are made with
``hide_parameters=True``; give your own engines the same (docs/consumers.md).
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator

from sqlalchemy.exc import StatementError

__all__ = ["chain", "error_text", "one_line", "printable", "redact", "traceback_text"]

_DETAIL = re.compile(r"^\s*(DETAIL|HINT|CONTEXT):.*$", re.MULTILINE)


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it came from, through both ``__cause__`` and
    ``__context__``, each once: a cycle in the chain does not loop."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend((current.__cause__, current.__context__))


def redact(error: BaseException) -> BaseException:
    """Hide the bound parameters of ``error`` and of every exception in its chain."""
    for current in chain(error):
        if isinstance(current, StatementError):
            current.hide_parameters = True
    return error


_TEXT_LIMIT = 64 * 1024
"""Error text is cut here: a handler's exception may say 10 MB, a dead letter keeps 64 KB."""


def error_text(error: BaseException) -> str:
    """``str(error)`` with its parameters hidden and PostgreSQL's row details left out, at
    most 64 KB. An exception whose ``__str__`` raises is named by its type: its text is
    read where a failure is logged and dead-lettered, which must not fail in turn."""
    try:
        text = str(redact(error))
    except Exception as exc:
        return f"<{type(error).__name__}: its text could not be read ({type(exc).__name__})>"
    if len(text) > _TEXT_LIMIT:
        text = text[:_TEXT_LIMIT] + "…"
    return _DETAIL.sub("", text).strip()


def one_line(error: BaseException) -> str:
    """``Type: first line of its redacted message`` (at most 300 characters), for a log line
    or a dead letter's reason."""
    text = error_text(error)
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line[:300]}" if line else type(error).__name__


def traceback_text(error: BaseException) -> str:
    """The formatted traceback of ``error``, redacted like :func:`error_text`."""
    redact(error)
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return _DETAIL.sub("", text)


def printable(text: str, limit: int = 500) -> str:
    """``text`` for one log line: control characters escaped, at most ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
