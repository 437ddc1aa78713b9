"""What kind of callable the application gave: async, sync, or either.

``inspect.iscoroutinefunction`` answers for the object itself: an instance whose
``__call__`` is ``async def`` reads as a plain callable, and calling it only makes a
coroutine that nobody awaits. :func:`is_async_callable` sees those (and partials).

A plain ``def`` decorated with ``functools.wraps`` around an ``async def`` is either kind:
a logging decorator returns the coroutine (async), a bridge such as asgiref's
``async_to_sync`` runs it to the end (sync). :func:`fits` accepts it for both; what it
returns decides at run time: :func:`call_sync` refuses a result to await (the work never
ran) and :func:`call_async` awaits it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any

from .errors import HandlerMisuse

__all__ = ["being_cancelled", "call_async", "call_sync", "fits", "is_async_callable"]


def is_async_callable(fn: object) -> bool:
    """``fn`` makes a coroutine when called: an ``async def`` (also through a
    ``functools.partial``), or an object whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if not inspect.isroutine(fn) and not inspect.isclass(fn):
        call = vars(type(fn)).get("__call__") or next(
            (vars(base)["__call__"] for base in type(fn).__mro__ if "__call__" in vars(base)),
            None,
        )
        return call is not None and inspect.iscoroutinefunction(call)
    return False


def wraps_async(fn: object) -> bool:
    """``fn`` is a plain callable whose ``__wrapped__`` chain (``functools.wraps``) holds an
    async one: either kind (see the module's docstring)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    try:
        unwrapped = inspect.unwrap(fn)  # type: ignore[arg-type]
    except ValueError:  # a cycle of __wrapped__
        return False
    return unwrapped is not fn and (is_async_callable(unwrapped) or wraps_async(unwrapped))


def fits(fn: object, is_async: bool) -> bool:
    """Whether ``fn`` can serve where callables are async (``is_async``) or sync: an async
    one only the first, a plain one only the second, one that wraps an async one both."""
    if is_async_callable(fn):
        return is_async
    return not is_async or wraps_async(fn)


async def call_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` where callables are async: its result awaited when it is to
    be awaited (a sync bridge around an async function returns the value itself)."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result


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
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        # A function with ``yield`` in it runs nothing until iterated, which nobody does.
        raise HandlerMisuse(
            f"{what} returned a {type(result).__name__} object instead of running (it has "
            "a yield in it): its work was not done. Make it a plain function that does "
            "the work itself"
        )
    return result


def being_cancelled() -> bool:
    """The running task is being cancelled (a shutdown), as opposed to a callable that
    raised :class:`asyncio.CancelledError` of its own (a failure like any other).
    Without ``Task.cancelling`` (before Python 3.11) every cancellation counts."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return task is None or cancelling is None or cancelling() > 0
