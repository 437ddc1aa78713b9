"""docs/migrations.md's Alembic env.py, in a real Alembic project, through each command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

import outboxer.schema

from .docsnippets import ROOT, file_block

ALEMBIC = Path(sys.executable).parent / "alembic"
MIGRATIONS_MD = ROOT / "docs" / "migrations.md"


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_the_documented_env_py_upgrades_outboxer_on_upgrade_and_on_no_other_command(
    empty_db_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "DATABASE_URL": empty_db_url}

    def alembic(*args: str) -> str:
        done = subprocess.run(
            [str(ALEMBIC), *args],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"alembic {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    alembic("init", "migrations")
    for title in ("myapp/models.py", "migrations/env.py"):
        path = tmp_path / title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(file_block(MIGRATIONS_MD, title).code)

    alembic("current")
    assert not {t for t in tables(empty_db_url) if t.startswith("outboxer")}, "current ran DDL"

    alembic("revision", "--autogenerate", "-m", "orders")
    (script,) = (tmp_path / "migrations" / "versions").glob("*_orders.py")
    generated = script.read_text()
    assert "create_table('orders'" in generated or 'create_table("orders"' in generated
    assert "outboxer" not in generated, "autogenerate proposed changes to outboxer's tables"
    assert not {t for t in tables(empty_db_url) if t.startswith("outboxer")}, "autogenerate ran DDL"

    alembic("upgrade", "head")
    assert {"orders", "alembic_version", *outboxer.metadata.tables} <= tables(empty_db_url)
    engine = create_engine(empty_db_url)
    try:
        assert outboxer.schema.current(engine) == outboxer.schema.head()
    finally:
        engine.dispose()

    alembic("check")  # no difference between the models and the database: outboxer's ignored

    sql = alembic("upgrade", "head", "--sql")
    assert "CREATE TABLE orders" in sql
    assert "CREATE TABLE outboxer_outbox" in sql
    head = outboxer.schema.head()
    # The first revision inserts the version row; later ones move it up to the head.
    assert "INSERT INTO outboxer_alembic_version (version_num) VALUES (" in sql
    assert (
        f"VALUES ('{head}')" in sql or f"outboxer_alembic_version SET version_num='{head}'" in sql
    )
    app_revision = script.name.split("_", 1)[0]
    ranged = alembic("upgrade", f"{app_revision}:head", "--sql")
    assert "outboxer_outbox" not in ranged and "run `outboxer db upgrade`" in ranged

    alembic("downgrade", "base")
    left = tables(empty_db_url)
    assert "orders" not in left
    assert set(outboxer.metadata.tables) <= left, "a downgrade of the app dropped outboxer's tables"
