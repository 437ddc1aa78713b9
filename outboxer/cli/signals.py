"""Stopping a long-running command: the first SIGTERM/SIGINT stops it gracefully, a second
one forces the exit at once (exit code 130).

The graceful stop finishes the batch or the messages in flight, which can take a while
(a slow handler, a broker confirm timeout); an operator who presses Ctrl-C again means
"now". Nothing is lost either way: unconfirmed messages stay in the outbox and
unacknowledged deliveries go back to the broker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType

from .shell import FORCED_EXIT

__all__ = ["graceful_stop"]

log = logging.getLogger("outboxer.cli")


@contextlib.contextmanager
def graceful_stop(stop: Callable[[], None], doing: str) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT call ``stop`` (logging ``doing``); a second signal
    exits the process at once. The previous handlers come back on the way out."""
    received = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            log.info("%s received: %s (send it again to exit at once)", name, doing)
            stop()
            return
        log.warning("%s received again: exiting now, without waiting", name)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stderr.flush()
        os._exit(FORCED_EXIT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
