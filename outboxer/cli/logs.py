"""Logging for the command line: ``--log-level`` and ``--log-format text|json``.

Every record is one line, whatever it carries: a database error's message spans several
lines (SQLAlchemy adds the SQL and a link, PostgreSQL a DETAIL), and a line-based log
collector would split it into several records. Newlines in the message become `` | ``.
Tracebacks are printed only at ``--log-level debug`` (then as part of the same record: one
JSON object, or the traceback lines after the message in text); at other levels a record
that carries an exception ends with the exception's one-line summary instead.

The application's own logging comes first: when the root logger already has handlers
(the consumer module called ``dictConfig`` or ``basicConfig``), outboxer adds none, sets
no format, and only applies a ``--log-level`` that was given explicitly, to outboxer's
loggers. ``dictConfig`` disables the loggers that existed before it ran (outboxer's,
since outboxer is imported first) unless the configuration names them; such accidental
silencing is undone, while levels the configuration sets are kept.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

__all__ = ["LEVELS", "FORMATS", "JsonFormatter", "TextFormatter", "configure"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
# Loggers of libraries that report every failed connection attempt at ERROR with a
# traceback; outboxer reports an outage itself, once, with what it does about it.
_NOISY = ("pika", "botocore", "urllib3")
_MARK = "outboxer_handler"


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _exception_summary(record: logging.LogRecord) -> str:
    if not record.exc_info or record.exc_info[1] is None:
        return ""
    exc = record.exc_info[1]
    first = _one_line(str(exc))
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message`` on one line; the traceback only when ``tracebacks``."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(record.getMessage())
        summary = _exception_summary(record)
        if summary and summary not in message:
            message = f"{message} ({summary})"
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"
        if self.tracebacks and record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and error, traceback)."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": _one_line(record.getMessage()),
        }
        summary = _exception_summary(record)
        if summary:
            entry["error"] = summary
            if self.tracebacks and record.exc_info:
                entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str | None, log_format: str = "text") -> None:
    """Set up logging for a command; ``level`` None means "not given on the command line"."""
    chosen = (level or "INFO").upper()
    debug = chosen == "DEBUG"
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _MARK, False)]
    application_configured = bool(root.handlers) and not ours
    outboxer = logging.getLogger("outboxer")
    _undo_accidental_disabling()
    if application_configured:
        if level is not None:
            outboxer.setLevel(chosen)
        return
    for handler in ours:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(JsonFormatter(debug) if log_format == "json" else TextFormatter(debug))
    root.addHandler(handler)
    root.setLevel(chosen)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)


def _undo_accidental_disabling() -> None:
    """Re-enable outboxer's loggers that a ``dictConfig`` disabled without naming them."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (name == "outboxer" or name.startswith("outboxer.")) and isinstance(
            logger, logging.Logger
        ):
            logger.disabled = False
