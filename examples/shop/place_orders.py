"""Create the tables and place a few orders: ``python -m shop.place_orders [COUNT]``."""

from __future__ import annotations

import sys

import outboxer

from .app import Base, engine, place_order


def main(count: int) -> None:
    # outboxer's tables: `outboxer db upgrade` made them (examples/README.md runs it first);
    # without it, create_all makes them for a quick try, which `db upgrade` then refuses.
    outboxer.create_all(engine)
    Base.metadata.create_all(engine)
    for n in range(count):
        order_id = place_order(customer=f"customer-{n % 3}", amount_cents=100 + n)
        print(f"order {order_id} placed; its OrderPlaced waits in the outbox")
    print(f"now run: outboxer relay --db {engine.url.render_as_string(hide_password=True)} ...")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
