"""The shop's models, its message and its consumer (what ``outboxer-inbox`` runs).

Configuration comes from the environment:

- ``SHOP_DB``: a SQLAlchemy URL (default: the compose file's PostgreSQL).
- ``SHOP_CONSUMER``: the billing consumer's (and its queue's) name (default ``shop-billing``).
- ``SHOP_AUDIT``: the audit consumer's name (default ``shop-audit``).

Two consumers handle ``OrderPlaced``: ``billing`` charges the card, ``audit`` records the
order. Each gets every order: on RabbitMQ each has its queue bound to the exchange, on AWS
(``sns://``) each has its SQS queue subscribed to the ``shop-orders`` topic.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from sqlalchemy import ForeignKey, Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import outboxer

log = logging.getLogger("shop")

DB_URL = os.environ.get("SHOP_DB", "postgresql+psycopg://shop:shop@localhost:5432/shop")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "shop_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    customer: Mapped[str] = mapped_column(String(200))
    amount_cents: Mapped[int] = mapped_column(Integer)


class AuditEntry(Base):
    __tablename__ = "shop_audit"
    order_id: Mapped[int] = mapped_column(ForeignKey("shop_orders.id"), primary_key=True)
    customer: Mapped[str] = mapped_column(String(200))


class Charge(Base):
    __tablename__ = "shop_charges"
    order_id: Mapped[int] = mapped_column(ForeignKey("shop_orders.id"), primary_key=True)
    amount_cents: Mapped[int] = mapped_column(Integer)


@outboxer.message("shop.order_placed", destination="shop-orders", key="customer")
@dataclass
class OrderPlaced:
    order_id: int
    customer: str
    amount_cents: int


engine = create_engine(DB_URL, pool_pre_ping=True)
Session = sessionmaker(engine, class_=outboxer.OutboxSession)


def place_order(customer: str, amount_cents: int) -> int:
    """The request handler: the order and its event commit together, or not at all."""
    with Session.begin() as session:
        order = Order(customer=customer, amount_cents=amount_cents)
        session.add(order)
        session.flush()  # assigns order.id
        session.publish(
            OrderPlaced(order_id=order.id, customer=customer, amount_cents=amount_cents)
        )
        return order.id


billing = outboxer.Consumer(
    Session,
    name=os.environ.get("SHOP_CONSUMER", "shop-billing"),
    retry=outboxer.Retry(max_attempts=5, initial_delay=1.0, max_delay=60.0),
)


@billing.handler(OrderPlaced)
def charge_card(event: OrderPlaced, session: outboxer.OutboxSession) -> None:
    """Runs at most once per order: its inbox row commits with the charge."""
    if event.amount_cents <= 0:
        raise ValueError(f"order {event.order_id}: amount must be positive")
    session.add(Charge(order_id=event.order_id, amount_cents=event.amount_cents))


@billing.handler(OrderPlaced)
def send_receipt(event: OrderPlaced) -> None:
    """Retried on its own if it fails; charge_card does not run again."""
    log.info("receipt for order %d sent to %s", event.order_id, event.customer)


audit = outboxer.Consumer(Session, name=os.environ.get("SHOP_AUDIT", "shop-audit"))


@audit.handler(OrderPlaced)
def record_order(event: OrderPlaced, session: outboxer.OutboxSession) -> None:
    """The audit trail: one entry per order, whatever billing does with it."""
    session.add(AuditEntry(order_id=event.order_id, customer=event.customer))
