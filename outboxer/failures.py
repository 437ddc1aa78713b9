"""Error channels: what runs when a handler gives up (Ecotone's error channel).

    def alert(failure: outboxer.Failure, session) -> None:
        sentry_sdk.capture_exception(failure.error)
        session.publish(PaymentFailed(order_id=failure.event.order_id))

    consumer = outboxer.Consumer(Session, name="billing", on_failure=alert)

    @consumer.handler(OrderPlaced, on_failure=outboxer.ErrorChannel(refund, dead_letter=False))
    def charge(event, session): ...

A handler's ``on_failure`` wins over its consumer's, which wins over the process-wide
default (:func:`set_default_on_failure`); without any, a failure goes to the dead-letter
table alone. ``on_failure`` is a function, an :class:`ErrorChannel`, or
the name of a channel registered with ``@consumer.error_channel("name")`` (a name that
is not registered yet raises at the handler's registration).

The callback runs when the handler gives up (retries exhausted or not retryable), once,
in a transaction of its own that also holds what follows it: the dead letter
(``dead_letter=True``, the default), or else the handler's inbox row, so a redelivery
neither runs the handler nor the callback again. What it publishes through ``session``
commits with that transaction. If the callback raises, its transaction rolls back and the
message is dead-lettered all the same, its error noting the callback's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from .callables import (
    being_cancelled,
    call_async,
    call_sync,
    fits,
    is_async_callable,
    wraps_async,
)
from .errors import ConfigurationError
from .guard import guarded
from .instrumentation import HandlerOutcome
from .message import Envelope, EnvelopeFacts
from .plan import error_type_name, plural
from .publishing import handling
from .redaction import error_text, printable, redact

__all__ = [
    "ErrorChannel",
    "Failure",
    "OnFailure",
    "channel_for",
    "RunChannel",
    "channel_steps",
    "default_channel",
    "set_default_on_failure",
]

log = logging.getLogger("outboxer.consumer")


@dataclass(frozen=True)
class Failure(EnvelopeFacts):
    """What an error channel is given about a handler that gave up (Ecotone's
    ``ErrorMessage``)."""

    event: Any
    """The decoded message the handler failed on."""
    envelope: Envelope
    """The message as received: id, type, headers, correlation, payload bytes."""
    error: BaseException
    """The last run's exception (secrets redacted, as in the dead letter)."""
    attempts: int
    """How many times the handler ran on this message."""
    consumer: str
    handler: str
    """The handler's name within its consumer."""
    reason: str
    """``exhausted`` (retries used up) or ``non_retryable``."""


@dataclass(frozen=True)
class ErrorChannel:
    """A failure callback, and whether the dead-letter table still gets the message.

    ``callback(failure, session=...)``: ``session`` (the channel's own transaction, an
    outbox session) is passed when the callback names it. ``dead_letter=True`` (default):
    the callback runs before the dead letter is stored, in the same transaction.
    ``dead_letter=False``: it runs instead (the handler's inbox row is written then, so the
    message counts as handled); if it raises, the dead letter is stored all the same.
    """

    callback: Callable[..., Any]
    dead_letter: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        if not callable(self.callback):
            raise ConfigurationError(
                f"an error channel needs a function, got {self.callback!r}: pass "
                "on_failure=my_function or outboxer.ErrorChannel(my_function)"
            )
        if not isinstance(self.dead_letter, bool):
            raise ConfigurationError(
                f"ErrorChannel(dead_letter=...) is True (the callback runs before the dead "
                f"letter) or False (instead of it), got {self.dead_letter!r}"
            )
        if not self.name:
            object.__setattr__(self, "name", getattr(self.callback, "__name__", "on_failure"))
        _check_signature(self.callback, self.name)

    @property
    def is_async(self) -> bool:
        """The callback is async, or may be (a plain def wrapping an async one): where
        callables are async, it is called and its result awaited."""
        return is_async_callable(self.callback) or wraps_async(self.callback)

    @property
    def wants_session(self) -> bool:
        parameters = inspect.signature(self.callback).parameters.values()
        return any(
            p.name == "session" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )


OnFailure = Callable[..., Any] | ErrorChannel | str | None
"""What ``on_failure=`` accepts: a function, an :class:`ErrorChannel`, a channel's name."""


def as_channel(on_failure: Callable[..., Any] | ErrorChannel, name: str = "") -> ErrorChannel:
    """``on_failure`` as an :class:`ErrorChannel` (a bare function keeps the dead letter)."""
    if isinstance(on_failure, ErrorChannel):
        return on_failure
    return ErrorChannel(on_failure, name=name)


_default: list[ErrorChannel] = []
"""The process-wide default channel, when one is set (a list: no ``global`` statement)."""


def set_default_on_failure(on_failure: Callable[..., Any] | ErrorChannel | None) -> None:
    """Set the error channel of every handler whose handler and consumer name none, in
    every consumer of this process (Ecotone's default error channel); None removes it.

    It must be a plain ``def`` (it serves sync and async consumers alike: an async
    consumer calls it with the sync side of its session). Typical use: report every
    give-up to Sentry once, at start-up. It applies from the next give-up on.
    """
    if on_failure is None:
        _default.clear()
        return
    if not (isinstance(on_failure, ErrorChannel) or callable(on_failure)):
        raise ConfigurationError(
            "set_default_on_failure takes a function or an outboxer.ErrorChannel, got "
            f"{on_failure!r}"
        )
    channel = as_channel(on_failure)
    if is_async_callable(channel.callback):
        raise ConfigurationError(
            f"the default error channel {channel.name!r} serves sync and async consumers: "
            "make it a plain def (give async consumers an async one with on_failure=...)"
        )
    _default[:] = [channel]


def default_channel() -> ErrorChannel | None:
    """The channel set by :func:`set_default_on_failure`, if any."""
    return _default[0] if _default else None


def channel_for(
    on_failure: OnFailure,
    named: Mapping[str, ErrorChannel],
    *,
    where: str,
    is_async: bool,
) -> ErrorChannel | None:
    """Resolve ``on_failure`` for ``where`` (``handler 'charge'``); ConfigurationError
    for a name that is not registered or a callback of the wrong kind (sync vs async)."""
    if on_failure is None:
        return None
    if isinstance(on_failure, str):
        channel = named.get(on_failure)
        if channel is None:
            known = ", ".join(repr(n) for n in sorted(named)) or "none yet"
            raise ConfigurationError(
                f"{where}: no error channel named {on_failure!r} (registered: {known}); "
                f"register it with @consumer.error_channel({on_failure!r}) above this line, "
                "or pass the function itself"
            )
    elif isinstance(on_failure, ErrorChannel) or callable(on_failure):
        channel = as_channel(on_failure)
    else:
        raise ConfigurationError(
            f"{where}: on_failure must be a function, an outboxer.ErrorChannel or the name "
            f"of one registered with @consumer.error_channel(...), got {on_failure!r}"
        )
    if not fits(channel.callback, is_async):
        kind = "a plain def" if is_async else "an async def"
        need = "async def" if is_async else "def"
        raise ConfigurationError(
            f"{where}: error channel {channel.name!r} is {kind} function but its consumer's "
            f"handlers are {'async' if is_async else 'sync'}; make it '{need}'"
        )
    return channel


def _check_signature(fn: Callable[..., Any], name: str) -> None:
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot inspect error channel {name!r}: {exc}") from exc
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not parameters or parameters[0].kind not in positional:
        raise ConfigurationError(
            f"error channel {name!r} must take the failure as its first positional parameter: "
            f"def {name}(failure: outboxer.Failure, session) -> None"
        )
    for p in parameters[1:]:
        if p.name == "session" or p.kind in (
            inspect.Parameter.VAR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            continue
        if p.default is inspect.Parameter.empty:
            raise ConfigurationError(
                f"error channel {name!r} has a parameter {p.name!r} outboxer cannot supply; "
                "error channels take (failure, session=...)"
            )


# Running a channel: its callback, then what follows it, in one transaction --------------

Then = Callable[[Connection], Any]
"""The write that follows the callback in its transaction (the dead letter, or the inbox
row); a failure of either rolls both back."""


@dataclass(frozen=True)
class ChannelResult:
    """How a channel's transaction ended: ``error`` is None when it committed."""

    error: BaseException | None = None
    in_callback: bool = False
    """The callback raised (not the write after it)."""


@dataclass(frozen=True)
class RunChannel:
    """I/O request: run ``channel`` on ``failure``, then ``then``, in one transaction."""

    channel: ErrorChannel
    failure: Failure
    then: Then

    def run_sync(self, session_factory: Callable[[], Any]) -> ChannelResult:
        """Carry it out with a sync session."""
        in_callback = True
        try:
            with session_factory() as session, session.begin():
                self._call_sync(session)
                in_callback = False
                self.then(session.connection())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            return ChannelResult(redact(exc), in_callback)
        return ChannelResult()

    async def run_async(self, session_factory: Callable[[], Any]) -> ChannelResult:
        """Carry it out with an async session and an ``async def`` callback."""
        in_callback = True
        then = self.then
        try:
            async with session_factory() as session, session.begin():
                if self.channel.is_async:
                    who = f"error channel {self.channel.name}"
                    with handling(self.failure.envelope), guarded(session.sync_session, who):
                        await call_async(
                            self.channel.callback, self.failure, **self._arguments(session)
                        )
                else:  # the process-wide default: a plain def, given the sync session
                    await session.run_sync(self._call_sync)
                in_callback = False
                await session.run_sync(lambda s: then(s.connection()))
        except (KeyboardInterrupt, SystemExit):
            raise  # shutdown: the delivery goes back, and the handler gives up again
        except asyncio.CancelledError as exc:
            if being_cancelled():
                raise  # the task is cancelled (shutdown), as above
            return ChannelResult(exc, in_callback)  # the callback's own: a failure
        except BaseException as exc:
            return ChannelResult(redact(exc), in_callback)
        return ChannelResult()

    def _call_sync(self, session: Any) -> None:
        who = f"error channel {self.channel.name}"
        # Guarded as a handler is: a channel that committed would leave its writes beside
        # a dead letter that says they were rolled back.
        with handling(self.failure.envelope), guarded(session, who):
            call_sync(self.channel.callback, who, self.failure, **self._arguments(session))

    def _arguments(self, session: Any) -> dict[str, Any]:
        return {"session": session} if self.channel.wants_session else {}


def channel_steps(
    channel: ErrorChannel, failure: Failure, handler: str, *, dead_letter: Then, inbox: Then
) -> Generator[RunChannel, ChannelResult, tuple[str | None, str]]:
    """Run ``channel`` for ``handler`` (its id) with the ``dead_letter`` write, or instead
    of it the ``inbox`` write, in its transaction. Returns the handler's outcome; or None
    and a note on what went wrong, when the dead letter is still to be written."""
    result = yield RunChannel(channel, failure, dead_letter if channel.dead_letter else inbox)
    if result.error is None:
        log.warning(
            "handler %s gave up on message %s after %s (%s); error channel %s ran%s: %s",
            handler,
            failure.message_id,
            plural(failure.attempts, "attempt"),
            failure.reason,
            channel.name,
            " and the message was dead-lettered" if channel.dead_letter else "",
            printable(error_text(failure.error)),
        )
        if channel.dead_letter:
            return HandlerOutcome.DEAD_LETTERED, ""
        return HandlerOutcome.ERROR_CHANNEL, ""
    what = "raised" if result.in_callback else "could not be committed"
    log.error(
        "error channel %s of handler %s %s on message %s; dead-lettering it: %s",
        channel.name,
        handler,
        what,
        failure.message_id,
        printable(error_text(result.error)),
    )
    note = (
        f"error channel {channel.name} {what}: "
        f"{error_type_name(result.error)}: {error_text(result.error)[:500]}"
    )
    return None, note
