"""SQLAlchemy's asyncio classes, or stand-ins when its asyncio extension cannot load.

SQLAlchemy 2.1 no longer installs greenlet, and ``sqlalchemy.ext.asyncio`` refuses to
import without it. outboxer's sync API must work on such an install (``pip install
outboxer`` alone), so the modules that mention the asyncio classes import them from here:

* with greenlet, ``AsyncSession`` and ``AsyncConnection`` are SQLAlchemy's own;
* without it, they are stand-ins that no object is an instance of (so ``isinstance``
  checks stay correct: nothing asynchronous can exist) and that raise
  :class:`~outboxer.errors.ConfigurationError` naming the extra to install when someone
  creates one (``outboxer.AsyncOutboxSession()`` subclasses the stand-in then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

__all__ = ["AVAILABLE", "AsyncConnection", "AsyncSession", "async_scoped_session"]

MISSING_HINT = (
    "outboxer's asyncio support needs SQLAlchemy's asyncio extension (greenlet): "
    "pip install 'outboxer[asyncio]'"
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    AVAILABLE: bool
else:
    try:
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
    except ImportError as exc:
        AVAILABLE = False
        _reason = exc

        class AsyncSession:
            """Stands in for SQLAlchemy's AsyncSession when greenlet is not installed."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ConfigurationError(MISSING_HINT) from _reason

        class AsyncConnection:
            """Stands in for SQLAlchemy's AsyncConnection when greenlet is not installed."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ConfigurationError(MISSING_HINT) from _reason

        class async_scoped_session:
            """Stands in for SQLAlchemy's async_scoped_session without greenlet."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ConfigurationError(MISSING_HINT) from _reason

    else:
        AVAILABLE = True
