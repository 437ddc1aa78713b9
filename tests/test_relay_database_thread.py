"""The relay's database thread: tasks in submission order, settles (urgent) first."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from outboxer.relay.database import DatabaseThread


@pytest.fixture
def db() -> Iterator[DatabaseThread]:
    thread = DatabaseThread()
    yield thread
    thread.shutdown()


def _busy(db: DatabaseThread) -> threading.Event:
    """Keep the thread in a task until the returned event is set."""
    running, go = threading.Event(), threading.Event()

    def block(_seq: int) -> None:
        running.set()
        assert go.wait(10)

    db.submit(block)
    assert running.wait(10)
    return go


def test_tasks_run_in_submission_order_with_their_sequence_numbers(db: DatabaseThread) -> None:
    ran: list[int] = []
    futures = [db.submit(ran.append) for _ in range(20)]
    db.shutdown()
    assert all(f.done() for f in futures)
    assert ran == sorted(ran) and len(set(ran)) == 20


def test_an_urgent_task_runs_before_every_task_not_yet_started(db: DatabaseThread) -> None:
    go = _busy(db)
    ran: list[str] = []
    db.submit(lambda _s: ran.append("claim a"))
    db.submit(lambda _s: ran.append("claim b"))
    seq, _ = db.submit_seq(lambda _s: ran.append("settle 1"), urgent=True)
    db.submit(lambda _s: ran.append("claim c"), urgent=False)
    db.submit(lambda _s: ran.append("settle 2"), urgent=True)
    go.set()
    db.shutdown()
    # Urgent tasks keep their own order; the rest keep theirs. A claim submitted after a
    # settle (claim c) still runs after it.
    assert ran == ["settle 1", "settle 2", "claim a", "claim b", "claim c"]
    assert seq == 4  # sequence numbers count submissions, whatever runs first


def test_a_task_that_raises_reaches_its_future_and_the_thread_goes_on(db: DatabaseThread) -> None:
    class Abort(BaseException):
        pass

    def fails(_seq: int) -> None:
        raise Abort

    failed = db.submit(fails)
    assert db.call(lambda: "still here") == "still here"
    with pytest.raises(Abort):
        failed.result(timeout=5)
    db.shutdown()


def test_shutdown_runs_what_is_queued_and_then_refuses_work(db: DatabaseThread) -> None:
    go = _busy(db)
    queued = [db.submit(lambda seq: seq) for _ in range(3)]
    go.set()
    db.shutdown()
    assert [f.result(timeout=0) for f in queued] == [2, 3, 4]
    with pytest.raises(RuntimeError, match="shut down"):
        db.submit(lambda seq: seq)


def test_a_cancelled_task_does_not_run(db: DatabaseThread) -> None:
    go = _busy(db)
    ran: list[int] = []
    cancelled = db.submit(ran.append)
    assert cancelled.cancel()
    go.set()
    db.shutdown()
    assert ran == []
