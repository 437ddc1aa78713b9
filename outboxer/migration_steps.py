"""The migrations' DDL steps, which a rerun finishes where DDL is not transactional.

MariaDB and MySQL commit each DDL statement as it runs, and so do PostgreSQL on an
``AUTOCOMMIT`` connection and SQLite (pysqlite runs DDL outside a transaction): a deploy
killed half-way through a revision (``kill -9``, a job timeout, a lost connection) leaves
the tables and indexes it made, without the revision recorded. The next upgrade runs that
revision again; there, each step keeps what exists in the shape the revision gives it and
makes what is missing. What has another shape (not made by outboxer's migrations) is
refused with a :class:`HalfApplied` error naming it and the fix. A clean upgrade runs the
same DDL as Alembic's own operations; offline (``--sql``) a step is Alembic's operation.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from alembic import op
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from .errors import ConfigurationError

__all__ = ["HalfApplied", "Steps", "first_revision_interrupted", "refuse_interrupted_adopt"]

log = logging.getLogger(__name__)

_TABLE_OPTIONS = {  # a create_table keyword -> what MariaDB's inspector calls it
    "mysql_engine": "mysql_engine",
    "mysql_charset": "mysql_default charset",
    "mysql_collate": "mysql_collate",
}


class HalfApplied(ConfigurationError):
    """A revision's table or index exists in another shape than the revision gives it."""


def first_revision_interrupted(connection: Connection) -> bool:
    """Whether outboxer tables exist beside an empty version table: the first revision's
    DDL ran and committed, its revision never recorded (an upgrade killed in it, or an
    ``outboxer db adopt`` killed before its record). ``create_all`` makes no version table."""
    from .schema import VERSION_TABLE, current, tables_present

    return (
        _has_table(connection, VERSION_TABLE)
        and current(connection) is None
        and bool(tables_present(connection))
    )


def refuse_interrupted_adopt(connection: Connection) -> None:
    """ConfigurationError when the newest revision's tables stand beside an empty version
    table: an ``outboxer db adopt`` killed between making the version table and recording
    the revision (not a first revision to finish: its tables have later revisions' shapes)."""
    from .schema import differences, head

    if first_revision_interrupted(connection) and not differences(connection):
        raise ConfigurationError(
            f"the outboxer tables match revision {head()} and no revision is recorded (an "
            "interrupted `outboxer db adopt`): run `outboxer db adopt` again"
        )


class Steps:
    """The DDL steps of one revision (``Steps(revision)`` in its script)."""

    def __init__(self, revision: str) -> None:
        self.revision = revision

    def create_table(self, name: str, *columns: sa.Column[Any], **kw: Any) -> None:
        """``op.create_table``; a table a killed run of this revision made is kept."""
        bind = self._resumable()
        if bind is None or not _has_table(bind, name):
            op.create_table(name, *columns, **kw)
            return
        wanted = sa.Table(name, sa.MetaData(), *columns, **kw)
        found = _table_differences(bind, wanted, kw)
        if found:
            raise HalfApplied(
                f"migration {self.revision} cannot make {name}: a table of that name exists "
                f"in another shape ({'; '.join(found[:3])}), which outboxer's migrations did "
                f"not make. Move out what it holds, drop it (DROP TABLE {name}), then run "
                "`outboxer db upgrade` again"
            )
        log.info("%s exists already (an interrupted upgrade made it): kept", name)

    def create_index(self, name: str, table: str, columns: list[str], **kw: Any) -> None:
        """``op.create_index``; an index a killed run of this revision made is kept."""
        bind = self._resumable()
        existing = {} if bind is None else _indexes(bind, table)
        if name not in existing:
            op.create_index(name, table, columns, **kw)
            return
        unique = bool(kw.get("unique", False))
        if existing[name] != (list(columns), unique):
            on, was_unique = existing[name]
            raise HalfApplied(
                f"migration {self.revision} cannot make index {name} on {table} "
                f"({', '.join(columns)}{', unique' if unique else ''}): an index of that name "
                f"exists on ({', '.join(on)}{', unique' if was_unique else ''}), which "
                f"outboxer's migrations did not make. Drop it (DROP INDEX {name} ON {table}), "
                "then run `outboxer db upgrade` again"
            )
        log.info(
            "index %s on %s exists already (an interrupted upgrade made it): kept", name, table
        )

    def alter_column_type(
        self, table: str, column: str, *, existing_type: Any, type_: Any, nullable: bool
    ) -> None:
        """``op.alter_column`` of a type (nullability unchanged), skipped when the column
        has the new type already (a killed run of this revision altered it)."""
        bind = self._resumable()
        if bind is not None:
            inspector = inspect(bind)
            columns = inspector.get_columns(table, schema=inspector.default_schema_name)
            found = {c["name"]: c for c in columns}.get(column)
            if (
                found is not None
                and found["nullable"] == nullable
                and _rendered(bind, found["type"]) == _rendered(bind, type_)
            ):
                log.info("%s.%s is %s already: kept", table, column, _rendered(bind, type_))
                return
        op.alter_column(
            table, column, existing_type=existing_type, type_=type_, existing_nullable=nullable
        )

    def drop_leftover_copy(self, table: str) -> None:
        """Before a rebuild of ``table`` (Alembic's batch mode: a copy ``_alembic_tmp_TABLE``
        made, the rows moved, the table dropped, the copy renamed; all but the first in
        one transaction): a copy a killed run left beside the table, which still holds
        every row, is dropped. A copy without the table (only the copy holds the rows) is
        refused, naming the rename that puts it back."""
        bind = self._resumable()
        copy = f"_alembic_tmp_{table}"
        if bind is None or not _has_table(bind, copy):
            return
        if not _has_table(bind, table):
            raise HalfApplied(
                f"migration {self.revision}'s rebuild of {table} stopped after dropping it: "
                f"its rows are in {copy}. Put it back (ALTER TABLE {copy} RENAME TO {table}), "
                "then run `outboxer db upgrade` again"
            )
        log.info(
            "%s, an interrupted upgrade's copy of %s, dropped: %s kept its rows", copy, table, table
        )
        op.drop_table(copy)

    def _resumable(self) -> Connection | None:
        """The connection, where a killed run of this revision may have left DDL behind
        (online, on any database: a run in a transaction finishes an AUTOCOMMIT run's
        work); None offline (``--sql``), where the DDL is only written out."""
        return None if op.get_context().as_sql else op.get_bind()


def _table_differences(bind: Connection, wanted: sa.Table, kw: dict[str, Any]) -> list[str]:
    """How the database's table ``wanted.name`` differs from ``wanted``: columns (types,
    nullability, server defaults), primary key, MariaDB's table options. Indexes are the
    revision's create_index steps' to judge."""
    from .schema import _same_server_default

    context = MigrationContext.configure(
        bind,
        opts={
            "compare_type": True,
            "compare_server_default": _same_server_default,
            "include_object": lambda obj, name, type_, *rest: (
                type_ != "table" or name == wanted.name
            ),
        },
    )
    index_kinds = ("add_index", "remove_index", "add_constraint", "remove_constraint")
    found = [
        _difference(diff)
        for diffs in compare_metadata(context, wanted.metadata)
        for diff in (diffs if isinstance(diffs, list) else [diffs])
        if diff[0] not in index_kinds
    ]
    inspector = inspect(bind)
    own = inspector.default_schema_name
    key = inspector.get_pk_constraint(wanted.name, schema=own)["constrained_columns"]
    if key != [c.name for c in wanted.primary_key.columns]:
        found.append(f"primary key ({', '.join(key)})")
    if bind.dialect.name in ("mysql", "mariadb"):
        options = inspector.get_table_options(wanted.name, schema=own)
        for option, reflected in _TABLE_OPTIONS.items():
            if option in kw and str(options.get(reflected, "")).lower() != kw[option].lower():
                found.append(f"{reflected.removeprefix('mysql_')} {options.get(reflected)}")
    return found


def _indexes(bind: Connection, table: str) -> dict[str, tuple[list[str], bool]]:
    """The indexes of ``table`` (none when it does not exist): their columns, uniqueness."""
    inspector = inspect(bind)
    own = inspector.default_schema_name
    if not inspector.has_table(table, schema=own):
        return {}
    return {
        str(index["name"]): ([str(c) for c in index["column_names"]], bool(index["unique"]))
        for index in inspector.get_indexes(table, schema=own)
    }


def _has_table(bind: Connection, name: str) -> bool:
    """Whether the schema the migrations create in holds ``name``. Not a bare has_table:
    on PostgreSQL that finds a table of any schema on the search_path (another
    application's outboxer tables), which the migration would then keep instead of
    making its own."""
    inspector = inspect(bind)
    return inspector.has_table(name, schema=inspector.default_schema_name)


def _rendered(bind: Connection, type_: Any) -> str:
    """A column type as the database's DDL spells it (``VARBINARY(1020)``)."""
    return str(sa.types.to_instance(type_).compile(dialect=bind.dialect)).upper()


def _difference(diff: tuple[Any, ...]) -> str:
    """One of Alembic's differences, the database's side first ("no column ran_at")."""
    kind = diff[0]
    if kind == "add_column":
        return f"no column {diff[3].name}"
    if kind == "remove_column":
        return f"a column {diff[3].name}"
    if kind == "modify_type":
        return f"{diff[3]} {diff[5]} (not {diff[6]})"
    if kind == "modify_nullable":
        return f"{diff[3]} {'NULL' if diff[5] else 'NOT NULL'}"
    if kind == "modify_default":
        return f"{diff[3]} DEFAULT {getattr(diff[5], 'arg', diff[5])}"
    return str(kind)
