"""STOP_GRACE bounds a stopping relay's whole wait on its database, counted from the stop
(docs: "a stop never held by a hung database"), not each wait anew: a database that
answers each call just within the grace (a server crawling on its disk) must not hold the
stop for the grace times the number of calls still queued (settles, claims, the
deregistration)."""

from __future__ import annotations

import threading
import time

import pytest

from outboxer.relay import database as relay_database
from outboxer.relay.database import Abandoned, DatabaseThread


def test_the_stop_grace_counts_from_the_stop_across_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_database, "STOP_GRACE", 1.0)
    db = DatabaseThread()
    stop = threading.Event()
    release = threading.Event()
    try:
        slow = [db.submit(lambda _seq: release.wait(0.7)) for _ in range(5)]
        stop.set()
        started = time.monotonic()
        with pytest.raises(Abandoned):
            for future in slow:  # as _shut_down does: one wait after the other
                db.result(future, stop)
        took = time.monotonic() - started
        assert took < 1.5, f"a stopping relay waited {took:.1f} s for a grace of 1 s"
    finally:
        release.set()
        assert db.shutdown(timeout=10)
