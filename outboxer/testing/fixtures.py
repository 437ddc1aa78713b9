"""pytest fixtures for applications' tests: ``pytest_plugins = ["outboxer.testing"]``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..transports.memory import MemoryBroker, MemoryTransport
from .recorder import Published

__all__ = ["outboxer_broker", "outboxer_published", "outboxer_transport"]


@pytest.fixture
def outboxer_published() -> Iterator[Published]:
    """The messages committed during the test (see :class:`~outboxer.testing.Published`)."""
    with Published() as published:
        yield published


@pytest.fixture
def outboxer_broker() -> MemoryBroker:
    """A fresh in-memory broker for this test alone."""
    return MemoryBroker()


@pytest.fixture
def outboxer_transport(outboxer_broker: MemoryBroker) -> Iterator[MemoryTransport]:
    """A transport to :func:`outboxer_broker`; pass it to ``drain()`` or ``consumer.run()``."""
    transport = MemoryTransport(outboxer_broker)
    yield transport
    transport.close()
