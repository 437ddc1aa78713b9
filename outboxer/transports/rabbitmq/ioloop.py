"""The I/O thread, and the pika plumbing that only it runs.

pika objects are not thread-safe, so each transport owns one daemon thread running a
``SelectConnection`` ioloop that all of its connections share; other threads hand it work
with :meth:`_IOThread.call`. Here too: the guard that keeps an exception in a callback from
stopping the loop, and the unwrapping of pika's error wrappers into what really failed.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from pika.adapters.select_connection import IOLoop

log = logging.getLogger("outboxer.transports.rabbitmq")

P = ParamSpec("P")
R = TypeVar("R")


def _logged(fn: Callable[P, R | None]) -> Callable[P, R | None]:
    """Run ``fn`` on the I/O thread without letting an exception stop the ioloop."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return fn(*args, **kwargs)
        except Exception:
            where = getattr(fn, "__qualname__", None) or repr(fn)
            log.exception("unexpected error in the RabbitMQ I/O thread (%s)", where)
            return None

    return wrapper


class _IOThread:
    """The daemon thread running the ioloop that all of one transport's connections share."""

    def __init__(self) -> None:
        self.ioloop = IOLoop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="outboxer-rabbitmq-io", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the I/O thread soon; callable from any thread."""
        self.ioloop.add_callback_threadsafe(_logged(fn))

    def _run(self) -> None:
        while not self._stopping:
            try:
                self.ioloop.start()
            except Exception:  # pika re-raises callback errors; keep the loop serving
                log.exception("the RabbitMQ ioloop failed; restarting it")

    def stop(self, timeout: float) -> None:
        self._stopping = True
        self.ioloop.add_callback_threadsafe(self.ioloop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.ioloop.close()


def _cause(error: BaseException) -> tuple[str, str]:
    """The class name and text of what really failed, out of pika's wrappers."""
    for _ in range(10):
        args = error.args
        if len(args) == 1 and isinstance(args[0], BaseException):
            error = args[0]
        elif getattr(error, "exceptions", None):
            error = error.exceptions[-1]  # type: ignore[attr-defined]
        elif isinstance(getattr(error, "exception", None), BaseException):
            error = error.exception  # type: ignore[attr-defined]
        else:
            break
    text = str(error) or repr(error)
    return type(error).__name__, text if len(text) < 500 else text[:497] + "..."
