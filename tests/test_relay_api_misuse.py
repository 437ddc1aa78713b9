"""Unusual but legal use of the ``Relay`` object (2026-11-30).

Before: ``relay.run()`` called from two threads on one ``Relay`` (to "send faster") ran two
loops over one liveness lock and connection: "database trouble (AssertionError)" and
SQLAlchemy's "transaction already deassociated from connection" warnings, and the second
run's start cleared a stop() meant for the first.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy.engine import Engine

import outboxer
from outboxer import heartbeat
from outboxer.errors import ConfigurationError
from outboxer.testing import MemoryBroker, MemoryTransport


@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)
def test_a_second_run_of_a_running_relay_is_refused_and_a_later_one_runs(engine: Engine) -> None:
    relay = outboxer.Relay(
        engine, MemoryTransport(MemoryBroker()), poll_interval=0.05, name=f"misuse-{uuid.uuid4()}"
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    first = threading.Thread(target=run, daemon=True)
    first.start()
    try:
        deadline = time.monotonic() + 10
        while heartbeat.seconds_since(f"relay {relay.name}") is None:
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.01)
        with pytest.raises(ConfigurationError, match="already running"):
            relay.run(once=True)
        assert first.is_alive()  # the refused run stopped nothing
    finally:
        relay.stop()
        first.join(15)
    assert not first.is_alive() and not errors, errors
    assert relay.run(once=True).batches == 0  # once the first has returned, run again
