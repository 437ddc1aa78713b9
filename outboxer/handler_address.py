"""A handler's address, ``consumer:handler``: what a retry or replay is sent to (the
envelope's ``handler``, a handler's :attr:`~outboxer.handlers.HandlerSpec.id`), and what
an operator names to re-address a dead letter (``--to-handler``)."""

from __future__ import annotations

from .errors import ConfigurationError
from .wire import control_at

__all__ = ["ADDRESS_FORM", "address_problem", "check_address", "own_name", "split_address"]

CONSUMER_NAME_LENGTH = 200
HANDLER_NAME_LENGTH = 50
"""The longest names :class:`~outboxer.Consumer` and its handlers take."""

ADDRESS_FORM = (
    "consumer:handler, as 'outboxer dead-letter list' shows it (e.g. billing:charge): "
    f"a consumer name of 1-{CONSUMER_NAME_LENGTH} characters, ':', a handler name of "
    f"1-{HANDLER_NAME_LENGTH}"
)


def split_address(address: str, consumer: str | None = None) -> tuple[str, str] | None:
    """(consumer, handler name) of ``address``, None if it is no handler's address. One
    that starts with ``consumer:`` is that consumer's (a handler's name may hold a ':');
    any other is split at its last ':'."""
    if consumer and address.startswith(f"{consumer}:"):
        name = address[len(consumer) + 1 :]
        if 0 < len(name) <= HANDLER_NAME_LENGTH:
            return consumer, name
    owner, colon, name = address.rpartition(":")
    if colon and 0 < len(owner) <= CONSUMER_NAME_LENGTH and 0 < len(name) <= HANDLER_NAME_LENGTH:
        return owner, name
    return None


def address_problem(address: object) -> str | None:
    """What makes ``address`` no handler's ``consumer:handler``, in one line (None: nothing)."""
    if not isinstance(address, str):
        return f"{address!r:.80} is not text; give {ADDRESS_FORM}"
    where = control_at(address)
    if where is not None:
        return (
            f"{address[:80]!r} holds a control character (U+{ord(address[where]):04X}); "
            f"give {ADDRESS_FORM}"
        )
    if split_address(address) is None:
        return f"{address[:300]!r} is not {ADDRESS_FORM}"
    return None


def check_address(address: str | None) -> None:
    """Raise :class:`~outboxer.ConfigurationError` naming the form if ``address`` (a
    ``to_handler``) is given and is no handler's address."""
    problem = None if address is None else address_problem(address)
    if problem is not None:
        raise ConfigurationError(f"to_handler: {problem}")


def own_name(address: str, consumer: str) -> str:
    """The handler column of a letter ``consumer`` parks for ``address``: the handler's
    name when the address is one of ``consumer``'s (as a handler's own dead letter stores
    it: ``list --handler NAME`` finds it, and a replay goes back to ``consumer:NAME``);
    the whole address otherwise (its replay then comes back unchanged)."""
    prefix = f"{consumer}:"
    return address[len(prefix) :] if address.startswith(prefix) and address != prefix else address
