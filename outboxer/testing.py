"""Test helpers for applications that use outboxer.

``MemoryTransport`` and ``MemoryBroker`` let you run your relay and consumers in-process:

    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    outboxer.Relay(engine, transport).run(once=True)
    assert [m.type for m in broker.published] == ["orders.placed"]
"""

from __future__ import annotations

from .transports.memory import MemoryBroker, MemoryTransport

__all__ = ["MemoryBroker", "MemoryTransport"]
