"""The chaos runner's arithmetic: what counts as lost, duplicated, out of order, recovered."""

from __future__ import annotations

import json
import time

from chaos.ledger import Ledger


def body(key: str, seq: int, n: int) -> bytes:
    return json.dumps({"key": key, "seq": seq, "n": n}).encode()


def test_a_first_delivery_after_a_later_one_of_its_key_is_an_order_violation() -> None:
    ledger = Ledger()
    for key, seq, n in [("a", 0, 0), ("b", 0, 1), ("a", 2, 4), ("a", 1, 2), ("b", 1, 3)]:
        ledger.record(body(key, seq, n))
    ledger.record(body("a", 0, 0))  # a duplicate re-sent later is not a violation
    figures = ledger.figures("t", published=6)
    assert (figures.delivered, figures.lost, figures.duplicated) == (5, 1, 1)
    assert figures.order_violations == 1
    assert not figures.ok


def test_a_broker_redelivery_to_the_collector_is_not_the_relays_duplicate() -> None:
    ledger = Ledger()
    ledger.record(body("a", 0, 0))
    ledger.record(body("a", 0, 0), redelivered=True)
    ledger.record(body("a", 1, 1), redelivered=True)  # never seen: a first delivery
    figures = ledger.figures("t", published=2)
    assert (figures.delivered, figures.duplicated, figures.order_violations) == (2, 0, 0)
    assert figures.ok


def test_recovery_waits_for_every_pending_key_and_ignores_the_settle_window() -> None:
    ledger = Ledger()
    expected = {"a": 2, "b": 2, "c": 1}
    ledger.record(body("c", 0, 0))
    ledger.record(body("a", 0, 1))
    assert ledger.pending_keys(expected) == {"a", "b"}
    since = time.monotonic()
    ledger.record(body("a", 1, 2))  # within the settle window: was in flight
    assert ledger.progressed({"a"}, since, settle=0.2) is None
    assert ledger.progressed({"a"}, since) is not None
    time.sleep(0.25)
    ledger.record(body("a", 1, 2))  # a duplicate is not progress
    assert ledger.progressed({"a"}, since, settle=0.2) is None
    ledger.record(body("b", 0, 3))
    assert ledger.progressed({"a", "b"}, since, settle=0.2) is None
    assert ledger.wait_progress({"a", "b"}, since, timeout=0.3, settle=0.2) is None
    ledger.record(body("b", 1, 4))
    assert ledger.progressed({"b"}, since, settle=0.2) is not None


def test_a_recovery_that_never_came_is_the_slowest() -> None:
    ledger = Ledger()
    figures = ledger.figures("t", published=0, recoveries=[1.5, None, 0.5])
    assert figures.recovery_max == float("inf")
    assert figures.recovery_median == 1.0
    assert figures.as_json()["recovery_max"] is None
    assert not figures.ok  # nothing published is no proof


def test_a_key_that_finished_within_the_settle_window_counts_as_recovered() -> None:
    """Found by CI: a relay fast enough to deliver a key's last messages within the settle
    window after a cut left that key with no later first delivery to wait for; the
    recovery timed out (None, "the slowest") although nothing was left to send."""
    from chaos.drain import Drain

    ledger = Ledger()
    drain = Drain("t", "sqlite://", "d", {"a": 2, "b": 2}, ledger)
    ledger.record(body("a", 0, 0))
    ledger.record(body("b", 0, 1))
    since = time.monotonic()
    ledger.record(body("a", 1, 2))  # a's last message, within the settle window
    time.sleep(0.3)
    ledger.record(body("b", 1, 3))  # b moves after the window
    took = drain.recovered(since, {"a", "b"}, timeout=1.0, settle=0.2)
    assert took is not None and 0.2 < took < 1.0
    assert drain.recoveries == [took]
    # Still waited for: a key with messages left and no delivery after the window.
    drain = Drain("t", "sqlite://", "d", {"a": 2, "c": 2}, ledger)
    ledger.record(body("c", 0, 4))
    assert drain.recovered(time.monotonic(), {"c"}, timeout=0.3, settle=0.1) is None
