"""Domain models and message types the tests publish."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import outboxer


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "test_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer: Mapped[str] = mapped_column(String(100), default="")


class Effect(Base):
    """A row a handler writes: lets tests count handler effects exactly."""

    __tablename__ = "test_effects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    handler: Mapped[str] = mapped_column(String(100))
    message_key: Mapped[str] = mapped_column(String(100))


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@outboxer.message("test.order_placed", destination="orders", key="order_id")
@dataclass
class OrderPlaced:
    order_id: int
    customer: str = "ada"


@outboxer.message("test.order_shipped", destination="orders")
@dataclass
class OrderShipped:
    order_id: int
    shipped_at: datetime
    tracking: UUID
    total: Decimal
    color: Color = Color.RED
    lines: list[str] = field(default_factory=list)


@outboxer.message("test.no_destination")
@dataclass
class NoDestination:
    n: int


@outboxer.message("test.invoice_created", destination="billing")
class InvoiceCreated(BaseModel):
    invoice_id: int
    amount: Decimal


@outboxer.message("test.anything", destination="misc")
@dataclass
class Anything:
    value: object
