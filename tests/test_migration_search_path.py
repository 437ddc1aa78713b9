"""The migrations look for their tables in the schema they create them in.

On PostgreSQL a table of another schema on the ``search_path`` (another application's
outboxer tables, say) is visible by its bare name; a fresh ``upgrade()`` must not take
it for one a killed run of its own made and "keep" it, creating nothing in its own
schema (review 6: the application then silently used the other application's tables).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, inspect, text

from outboxer import schema
from outboxer.tables import metadata

from .test_review3_deployment import fresh_database


@pytest.fixture
def pg_db() -> Iterator[str]:
    yield from fresh_database("postgresql")


def _tables(url: str, schema_name: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names(schema=schema_name))
    finally:
        engine.dispose()


def test_a_fresh_upgrade_creates_its_tables_beside_another_schemas_on_the_search_path(
    pg_db: str,
) -> None:
    other = create_engine(pg_db, connect_args={"options": "-csearch_path=other"})
    with other.begin() as connection:
        connection.execute(text("CREATE SCHEMA other"))
    schema.upgrade(other)
    with other.begin() as connection:  # made by create_all, as it were: no version table
        connection.execute(text(f"DROP TABLE other.{schema.VERSION_TABLE}"))
    other.dispose()
    theirs = _tables(pg_db, "other")

    engine = create_engine(pg_db, connect_args={"options": "-csearch_path=public,other"})
    try:
        schema.upgrade(engine)
        assert schema.current(engine) == schema.head()
    finally:
        engine.dispose()
    assert _tables(pg_db, "public") == set(metadata.tables) | {schema.VERSION_TABLE}
    assert _tables(pg_db, "other") == theirs


def test_another_schemas_version_table_on_the_search_path_is_not_taken_for_ours(
    pg_db: str,
) -> None:
    """Another application upgraded with Alembic (its version table in ``other``): a fresh
    ``upgrade()`` read that one, said 0006, and created nothing in its own schema."""
    other = create_engine(pg_db, connect_args={"options": "-csearch_path=other"})
    with other.begin() as connection:
        connection.execute(text("CREATE SCHEMA other"))
    schema.upgrade(other)
    other.dispose()
    theirs = _tables(pg_db, "other")

    engine = create_engine(pg_db, connect_args={"options": "-csearch_path=public,other"})
    try:
        assert schema.current(engine) is None
        schema.upgrade(engine)
        assert schema.current(engine) == schema.head()
    finally:
        engine.dispose()
    assert _tables(pg_db, "public") == set(metadata.tables) | {schema.VERSION_TABLE}
    assert _tables(pg_db, "other") == theirs
