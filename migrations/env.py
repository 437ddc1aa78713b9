"""Alembic environment for outboxer's own migrations.

Used when a developer runs ``alembic`` on this directory (for example
``alembic -x db=postgresql+psycopg://... revision --autogenerate -m "..."``). Running the
migrations is done by ``outboxer db upgrade`` / ``outboxer.schema.upgrade()``, which do
not need this file.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from outboxer.schema import VERSION_TABLE
from outboxer.tables import metadata

url = context.get_x_argument(as_dictionary=True).get("db") or context.config.get_main_option(
    "sqlalchemy.url"
)
if not url:
    raise SystemExit("pass the database URL: alembic -x db=URL ...")
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
