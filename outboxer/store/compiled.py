"""Statements compiled once and run with ``exec_driver_sql``, for the hottest paths.

Executing a SQLAlchemy construct costs a cache lookup, parameter processing and an
execution context per call: more than the statement itself for one small row. For the
statements run once per message (the producer's insert, the inbox row), the SQL is
compiled once per dialect and shape; values go through the columns' own type converters,
and SQLAlchemy's cursor events still see every execution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["Compiled"]


@dataclass(frozen=True)
class Compiled:
    sql: str
    positional: bool
    order: tuple[str, ...]
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]
    defaults: tuple[tuple[str, Any], ...] = ()
    """Values the statement itself binds (literals such as a ``LIMIT 1``)."""

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect) -> Compiled:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        # The bound columns' type converters for this dialect (UUIDs, UTC datetimes...).
        processors = compiled._bind_processors
        return cls(
            sql=compiled.string,
            positional=bool(compiled.positional),
            order=tuple(compiled.positiontup or ()),
            processors=tuple(
                (name, fn) for name, fn in processors.items() if fn is not None and callable(fn)
            ),
            defaults=tuple(
                (name, bind.effective_value)
                for bind, name in compiled.bind_names.items()
                if not bind.required
            ),
        )

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
        """The DBAPI parameters for ``values`` (keyed by bind parameter name)."""
        converted = dict(self.defaults)
        converted.update(values)
        for name, process in self.processors:
            if name in converted:
                converted[name] = process(converted[name])
        if self.positional:
            return tuple(converted[name] for name in self.order)
        return converted
