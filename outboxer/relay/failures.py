"""The relay's error channel: ``Relay(..., on_failure=...)`` for messages it gives up on.

    def page_on_call(failure: outboxer.SendFailure) -> None:
        sentry_sdk.capture_message(f"undeliverable {failure.message_type}: {failure.error}")

    outboxer.Relay(engine, transport, on_failure=page_on_call)

The callback runs after the dead letter is committed, once per message, in the relay's
own thread; with a ``session`` parameter it gets an outbox session of its own, whose
transaction commits when it returns, so it can record the failure or publish a
compensating message. Unlike a handler's error channel it cannot replace the dead
letter: once the outbox row is gone the dead letter is the message's only copy, and its
replay (after the broker or the destination is fixed) is how it still gets out. A
callback that raises is logged and changes nothing else: the relay carries on, also
after a BaseException that is not a request to stop (``asyncio.CancelledError`` from a
client's timeout, a library's own); KeyboardInterrupt and SystemExit still stop it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from ..callables import call_sync, is_async_callable
from ..errors import ConfigurationError
from ..message import Envelope, EnvelopeFacts
from ..redaction import printable
from ..session import OutboxSession

__all__ = ["SendFailure", "check_callback", "notify"]

log = logging.getLogger("outboxer.relay")


@dataclass(frozen=True)
class SendFailure(EnvelopeFacts):
    """A message the relay dead-lettered: what ``Relay(on_failure=...)`` is given."""

    envelope: Envelope
    error_type: str
    """``unroutable``, a broker's refusal, ``too_large``..."""
    error: str
    attempts: int
    """How many sends failed."""

    @property
    def destination(self) -> str:
        return self.envelope.destination


def check_callback(on_failure: Callable[..., Any] | None) -> bool:
    """ConfigurationError unless ``on_failure`` is None or a plain function taking the
    failure (and optionally ``session``); returns whether it wants a session."""
    if on_failure is None:
        return False
    if not callable(on_failure) or is_async_callable(on_failure):
        raise ConfigurationError(
            f"Relay(on_failure=...) takes a plain function "
            f"def on_failure(failure: outboxer.SendFailure, session) -> None, got {on_failure!r}"
        )
    try:
        parameters = list(inspect.signature(on_failure).parameters.values())
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot inspect Relay(on_failure={on_failure!r}): {exc}") from exc
    needed = [
        p
        for p in parameters[1:]
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name != "session"
    ]
    if not parameters or needed:
        raise ConfigurationError(
            "Relay(on_failure=...) is called as on_failure(failure) or "
            "on_failure(failure, session=...); "
            f"{getattr(on_failure, '__name__', on_failure)!r} cannot be"
        )
    return any(p.name == "session" or p.kind is p.VAR_KEYWORD for p in parameters[1:])


def notify(
    on_failure: Callable[..., Any],
    wants_session: bool,
    engine: Engine,
    failures: list[SendFailure],
) -> None:
    """Call ``on_failure`` for each of ``failures`` (dead letters already committed).

    Whatever the callback raises is logged, BaseExceptions included: a callback is not the
    relay's to be stopped by (``asyncio.CancelledError`` here is a pager client's timeout,
    not the relay being cancelled). KeyboardInterrupt and SystemExit are requests to stop
    the process, and go on up."""
    for failure in failures:
        try:
            if wants_session:
                with OutboxSession(engine) as session, session.begin():
                    call_sync(on_failure, "Relay(on_failure=...)", failure, session=session)
            else:
                call_sync(on_failure, "Relay(on_failure=...)", failure)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            log.error(
                "the relay's on_failure raised on message %s (dead-lettered all the same): %s: %s",
                failure.message_id,
                type(exc).__name__,
                printable(str(exc)),
            )
