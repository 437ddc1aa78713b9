"""What kind of callable the application gave: async or not, whatever wraps it.

``inspect.iscoroutinefunction`` answers for the object itself: a plain decorator
(``functools.wraps``) around an ``async def``, or an instance whose ``__call__`` is
``async def``, reads as a plain function, and calling it only makes a coroutine that
nobody awaits. :func:`is_async_callable` looks through both; :func:`call_sync` is the
backstop for what no inspection can see (a plain ``def`` that returns a coroutine).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any

from .errors import HandlerMisuse

__all__ = ["being_cancelled", "call_sync", "is_async_callable"]


def is_async_callable(fn: object) -> bool:
    """``fn`` makes a coroutine when called: an ``async def``, one behind ``functools.wraps``
    decorators or a ``functools.partial``, or an object whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    try:
        unwrapped = inspect.unwrap(fn)  # type: ignore[arg-type]
    except ValueError:  # a cycle of __wrapped__
        unwrapped = fn
    if unwrapped is not fn and is_async_callable(unwrapped):
        return True
    if not inspect.isroutine(fn) and not inspect.isclass(fn):
        call = vars(type(fn)).get("__call__") or next(
            (vars(base)["__call__"] for base in type(fn).__mro__ if "__call__" in vars(base)),
            None,
        )
        return call is not None and inspect.iscoroutinefunction(call)
    return False


def call_sync(fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` for a callable registered as synchronous; a result that must
    be awaited is closed, not left pending, and raises :class:`HandlerMisuse` (its work
    never ran)."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "coroutine was never awaited" warning: the error says it
        raise HandlerMisuse(
            f"{what} returned {type(result).__name__} object instead of running: its work "
            "was not done. Declare it async def (with an async session factory), or make "
            "it a plain function that does the work itself"
        )
    return result


def being_cancelled() -> bool:
    """The running task is being cancelled (a shutdown), as opposed to a callable that
    raised :class:`asyncio.CancelledError` of its own (a failure like any other).
    Without ``Task.cancelling`` (before Python 3.11) every cancellation counts."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return task is None or cancelling is None or cancelling() > 0
