"""The service's database: an async engine, outbox sessions, its tables.

``ORDERS_DB`` names the database (an async driver: ``postgresql+psycopg://...``,
``sqlite+aiosqlite:///...``).
"""

from __future__ import annotations

import os

from sqlalchemy import ForeignKey, String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import outboxer

DATABASE_URL = os.environ.get("ORDERS_DB", "sqlite+aiosqlite:///orders.sqlite")

engine = create_async_engine(DATABASE_URL)
# expire_on_commit=False: an endpoint reads the order's id after its transaction committed.
Session = async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "api_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    customer: Mapped[str] = mapped_column(String(200))
    amount_cents: Mapped[int]


class Shipment(Base):
    __tablename__ = "api_shipments"
    order_id: Mapped[int] = mapped_column(ForeignKey("api_orders.id"), primary_key=True)


async def create_tables() -> None:
    """The service's own tables (outboxer's come from ``outboxer db upgrade``)."""
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    await engine.dispose()


if __name__ == "__main__":  # python -m orders_api.db
    import asyncio

    asyncio.run(create_tables())
