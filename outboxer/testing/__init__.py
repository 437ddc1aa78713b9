"""Testing applications that use outboxer: an in-memory broker, a recorder, a drain, fixtures.

* :class:`MemoryBroker` / :class:`MemoryTransport`: a broker in the test's process.
* :class:`Published`: the messages committed transactions stored (assert what a
  transaction published).
* :func:`drain` / :func:`drain_async`: relay and consume synchronously until nothing
  moves; a handler's exception is raised in the test (:class:`HandlerFailed`), and so is
  a message a consumer could not read (:class:`MessageRejected`).
* pytest fixtures, with ``pytest_plugins = ["outboxer.testing"]`` in your ``conftest.py``:
  ``outboxer_published`` (a :class:`Published` recording during the test),
  ``outboxer_broker`` (a fresh :class:`MemoryBroker`) and ``outboxer_transport`` (a
  :class:`MemoryTransport` to it).

Guide: docs/testing.md.
"""

from __future__ import annotations

import importlib.util

from ..transports.memory import MemoryBroker, MemoryTransport
from .drain import DrainReport, HandlerFailed, MessageRejected, drain, drain_async
from .recorder import Published

__all__ = [
    "DrainReport",
    "HandlerFailed",
    "MemoryBroker",
    "MessageRejected",
    "MemoryTransport",
    "Published",
    "drain",
    "drain_async",
]

# The fixtures need pytest; the helpers above do not.
if importlib.util.find_spec("pytest") is not None:
    from .fixtures import outboxer_broker, outboxer_published, outboxer_transport

    __all__ += ["outboxer_broker", "outboxer_published", "outboxer_transport"]
