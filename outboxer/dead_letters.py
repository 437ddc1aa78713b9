"""Inspect, replay and delete dead letters.

    dead = outboxer.DeadLetters(Session)
    for letter in dead.list(handler="charge"):
        print(letter.id, letter.error_type, letter.error_message)
    dead.replay(letter.id)          # back through the outbox, to that one handler

A replay writes a new outbox row in the same transaction that removes the dead letter
(or, with ``keep=True``, marks it replayed: it then leaves :meth:`DeadLetters.list`
unless ``include_replayed=True``). Where it goes depends on where it failed:

* ``handler``: to the consumer's own destination, addressed to that handler alone, with
  a fresh attempt count; the other handlers of the message do not run again;
* ``relay``: to its original destination;
* ``consumer`` (it could not be used): back to the consumer, for all its handlers, once
  the code can handle it; one that was for a single handler (a retry or replay for a
  handler the consumer does not have, an inbound adapter's message) to that handler
  alone; a message with no readable envelope (or, from an adapter, no id) cannot be
  replayed.

``replay(id, to_handler="consumer:handler")`` re-addresses it: to that consumer's queue,
for that one handler, with a fresh attempt count (a handler that was renamed, say);
``replay_all(handler=..., to_handler=...)`` does so for every letter of one handler.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from . import instrumentation, store, wire
from .errors import ConfigurationError, DeadLetterNotFound, OutboxerError
from .handler_address import check_address, split_address
from .message import Envelope
from .plan import FIRST_FAILED_AT
from .store import dead_letter_replay as replay_store
from .store import dead_letters as dead_letter_store
from .store.dead_letters import DeadLetter, DeadLetterFilter
from .store.relay import MALFORMED_HEADERS
from .tables import outbox

__all__ = ["DeadLetter", "DeadLetterFilter", "DeadLetters"]

Progress = Callable[[int], None]
Skipped = Callable[[int, str], None]
"""Told the id of a dead letter a bulk replay left where it is, and why."""


class DeadLetters:
    """The dead-letter table, through ``session_factory`` (a sync ``sessionmaker``)."""

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        if not callable(session_factory):
            raise ConfigurationError(
                "DeadLetters needs a session factory (sessionmaker(engine)), got "
                f"{session_factory!r}"
            )
        self.session_factory = session_factory

    def list(
        self,
        *,
        origin: str | None = None,
        consumer: str | None = None,
        handler: str | None = None,
        message_type: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        include_replayed: bool = False,
        limit: int = 50,
        before_id: int | None = None,
    ) -> list[DeadLetter]:
        """Newest first, ``limit`` at a time; pass the last id as ``before_id`` for more."""
        where = DeadLetterFilter(
            origin, consumer, handler, message_type, error_type, since, until, include_replayed
        )
        with self._transaction() as connection:
            return dead_letter_store.list_dead_letters(
                connection, where, limit=limit, before_id=before_id
            )

    def get(self, dead_letter_id: int) -> DeadLetter:
        """One dead letter; :class:`DeadLetterNotFound` if there is none with that id."""
        with self._transaction() as connection:
            found = dead_letter_store.get_dead_letter(connection, dead_letter_id)
        if found is None:
            raise DeadLetterNotFound(f"no dead letter has id {dead_letter_id}")
        return found

    def count(self) -> dict[str, int]:
        """Dead letters waiting, by origin."""
        with self._transaction() as connection:
            return dead_letter_store.count_dead_letters(connection)

    def replay(
        self, dead_letter_id: int, *, keep: bool = False, to_handler: str | None = None
    ) -> UUID:
        """Send a dead letter again (see the module docs for where); returns its message id.

        ``to_handler`` (``consumer:handler``) sends it to that handler alone instead.
        :class:`DeadLetterNotFound` if there is none with that id (or another replay took
        it meanwhile); :class:`~outboxer.ConfigurationError` for a ``to_handler`` that is
        no handler's address; :class:`~outboxer.OutboxerError` naming the fix if it cannot
        be replayed as it is stored. Two replays of one letter at once send it once.
        """
        check_address(to_handler)
        with self._transaction() as connection:
            letter = dead_letter_store.get_dead_letter(connection, dead_letter_id, for_update=True)
            if letter is None:
                raise DeadLetterNotFound(f"no dead letter has id {dead_letter_id}")
            if letter.replayed_at is not None:
                # Kept as history: its message is in the outbox (or delivered) already. If it
                # fails again, that failure is a new dead letter, to replay in its turn.
                raise OutboxerError(
                    f"dead letter {dead_letter_id} was already replayed at "
                    f"{letter.replayed_at.isoformat()}; a second replay would send it twice"
                )
            envelope = _envelope(letter, to_handler)
            if not self._replay_one(connection, letter, envelope, keep):
                raise DeadLetterNotFound(
                    f"dead letter {dead_letter_id} was replayed or deleted by someone else "
                    "meanwhile; it was not sent again"
                )
            assert letter.message_id is not None
            return letter.message_id

    def replay_all(
        self,
        *,
        origin: str | None = None,
        consumer: str | None = None,
        handler: str | None = None,
        message_type: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        keep: bool = False,
        batch_size: int = 100,
        progress: Progress | None = None,
        skipped: Skipped | None = None,
        up_to_id: int | None = None,
        to_handler: str | None = None,
    ) -> int:
        """Replay every dead letter matching the filters, ``batch_size`` per transaction.

        ``to_handler`` (``consumer:handler``) sends each to that handler alone; it needs
        the ``consumer`` and ``handler`` filters (whose handler the letters were for), so
        that the letters of other handlers, or of another consumer's handler of the same
        name, or of none, are not re-addressed with them.

        The letters are those matching when the call starts (ids up to ``up_to_id`` if
        given): a replay that fails again while this runs is a new dead letter, left for
        the next replay-all. Letters that cannot be replayed as stored (no readable
        envelope, headers edited into something else than a JSON object of text...) stay,
        and ``skipped`` is called with each one's id and why. Returns how many were
        replayed; ``progress`` is called with each batch's count.
        """
        check_address(to_handler)
        if to_handler is not None and (consumer is None or handler is None):
            raise ConfigurationError(
                f"replay_all(to_handler={to_handler!r}) needs consumer=... and handler=... "
                "too (whose handler the letters were for), so that other handlers' letters, "
                "another consumer's of the same name included, are not re-addressed"
            )
        where = DeadLetterFilter(origin, consumer, handler, message_type, error_type, since, until)
        replayed = 0
        for ids in self._batches(where, batch_size, up_to_id):
            done = 0
            with self._transaction() as connection:
                for dead_letter_id in ids:
                    letter = dead_letter_store.get_dead_letter(
                        connection, dead_letter_id, for_update=True
                    )
                    if letter is None or letter.replayed_at is not None:
                        continue  # replayed or deleted by someone else meanwhile
                    try:
                        envelope = _envelope(letter, to_handler)
                        # Too large for this database's outbox: said before any write, so
                        # the other letters of the batch still go.
                        store.check_size(store.NewMessage(envelope), connection.engine)
                    except OutboxerError as exc:
                        if skipped is not None:
                            skipped(letter.id, str(exc))
                        continue
                    done += self._replay_one(connection, letter, envelope, keep)
            replayed += done
            if progress is not None:
                progress(len(ids))
        return replayed

    def delete(self, dead_letter_id: int) -> None:
        """Delete one dead letter; :class:`DeadLetterNotFound` if there is none."""
        with self._transaction() as connection:
            if not dead_letter_store.delete_dead_letters(connection, [dead_letter_id]):
                raise DeadLetterNotFound(f"no dead letter has id {dead_letter_id}")

    def purge(
        self,
        *,
        origin: str | None = None,
        consumer: str | None = None,
        handler: str | None = None,
        message_type: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        include_replayed: bool = True,
        batch_size: int = 500,
        progress: Progress | None = None,
        up_to_id: int | None = None,
    ) -> int:
        """Delete every dead letter matching the filters, ``batch_size`` per transaction.

        Those matching when the call starts (ids up to ``up_to_id`` if given): a letter
        written while it runs is not deleted unseen. Interrupted, it has deleted whole
        batches; run it again for the rest.
        """
        where = DeadLetterFilter(
            origin, consumer, handler, message_type, error_type, since, until, include_replayed
        )
        deleted = 0
        for ids in self._batches(where, batch_size, up_to_id):
            with self._transaction() as connection:
                deleted += dead_letter_store.delete_dead_letters(connection, ids)
            if progress is not None:
                progress(len(ids))
        return deleted

    def matching(
        self,
        *,
        origin: str | None = None,
        consumer: str | None = None,
        handler: str | None = None,
        message_type: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        include_replayed: bool = False,
        up_to_id: int | None = None,
    ) -> int:
        """How many dead letters match the filters, with ids up to ``up_to_id`` if given
        (for progress bars and confirmations: give the ``up_to_id`` the bulk call gets)."""
        where = DeadLetterFilter(
            origin, consumer, handler, message_type, error_type, since, until, include_replayed
        )
        with self._transaction() as connection:
            return dead_letter_store.count_matching(connection, where, up_to_id=up_to_id)

    # -----------------------------------------------------------------------------------

    def _replay_one(
        self, connection: Connection, letter: DeadLetter, envelope: Envelope, keep: bool
    ) -> bool:
        """Send ``envelope`` for ``letter`` unless another replay claimed the letter first."""
        if not replay_store.claim_for_replay(connection, letter.id, keep=keep):
            return False
        tracer = instrumentation.get()
        attributes: dict[str, Any] = {
            "outboxer.dead_letter.id": letter.id,
            "outboxer.dead_letter.origin": letter.origin,
        }
        if envelope.handler:
            attributes["outboxer.handler"] = envelope.handler
        with tracer.replay(letter.trace_headers, attributes) as span:
            trace = span.trace_headers()
            if trace:
                envelope = replace(
                    envelope,
                    traceparent=trace.get("traceparent"),
                    tracestate=trace.get("tracestate"),
                )
            store.insert_messages(connection, [store.NewMessage(envelope)])
        return True

    def _batches(
        self, where: DeadLetterFilter, size: int, up_to_id: int | None
    ) -> Iterator[builtins.list[int]]:
        """The ids matching ``where``, ``size`` at a time, up to the newest matching now."""
        after = 0
        with self._transaction() as connection:
            newest = replay_store.newest_matching(connection, where)
        up_to = newest if up_to_id is None else min(newest, up_to_id)
        while after < up_to:
            with self._transaction() as connection:
                ids = replay_store.ids_matching(
                    connection, where, after_id=after, up_to_id=up_to, limit=size
                )
            if not ids:
                return
            yield ids
            after = ids[-1]

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self.session_factory() as session, session.begin():
            yield session.connection()


def _envelope(letter: DeadLetter, to_handler: str | None) -> Envelope:
    # Called as replay_envelope(letter) when not re-addressed: the one-argument form
    # tests wrap to hold two replays of one letter at the same point.
    return replay_envelope(letter) if to_handler is None else replay_envelope(letter, to_handler)


def replayable(letter: DeadLetter) -> bool:
    return letter.message_id is not None and letter.message_type is not None


def replay_envelope(letter: DeadLetter, to_handler: str | None = None) -> Envelope:
    """The message a replay sends, per the rules in the module docs (``to_handler``: to
    that handler alone, checked by :func:`check_address` first)."""
    if not replayable(letter):
        raise OutboxerError(
            f"dead letter {letter.id} cannot be replayed: it has no readable envelope "
            f"({letter.error_type}: {letter.error_message}); inspect it with "
            f"'outboxer dead-letter show {letter.id}', then delete it"
        )
    assert letter.message_id is not None and letter.message_type is not None
    if letter.origin not in dead_letter_store.ORIGINS:
        raise OutboxerError(
            f"dead letter {letter.id} has origin {letter.origin!r}; outboxer writes "
            f"{', '.join(dead_letter_store.ORIGINS)} only, and replays each its own way. Set "
            f"it back (UPDATE outboxer_dead_letter SET origin = ... WHERE id = {letter.id}), "
            "or delete it"
        )
    _check_headers(letter)
    readdress = (
        f"replay it to the handler it is for (outboxer dead-letter replay {letter.id} "
        "--to-handler CONSUMER:HANDLER)"
    )
    if to_handler is not None:
        check_address(to_handler)
        owner = split_address(to_handler, letter.consumer)
        assert owner is not None
        destination, handler = owner[0], to_handler
    elif dead_letter_store.was_cut(letter.handler, "handler"):
        assert letter.handler is not None
        raise OutboxerError(
            f"dead letter {letter.id} cannot be replayed as stored: the name of the handler "
            f"it was for was longer than its column, and was cut ({letter.handler[:60]!r}...); "
            f"{readdress}, or delete it"
        )
    elif letter.origin == "handler":
        if not letter.consumer or not letter.handler:
            raise OutboxerError(
                f"dead letter {letter.id} is a handler's but names no consumer and handler "
                "to replay to; set its consumer and handler columns (UPDATE "
                f"outboxer_dead_letter SET consumer = ..., handler = ... WHERE id = {letter.id})"
                f", {readdress}, or delete it"
            )
        destination, handler = letter.consumer, f"{letter.consumer}:{letter.handler}"
    elif letter.origin == "consumer":
        destination, handler = letter.consumer or letter.destination or "", None
        # For one handler (a retry or replay for a handler the consumer does not have,
        # an inbound adapter's message): back to it alone.
        if letter.consumer and letter.handler:
            handler = f"{letter.consumer}:{letter.handler}"
    else:  # relay: the envelope's own handler (consumer:handler) for a retry or replay
        destination, handler = letter.destination or "", letter.handler
    if not destination:
        raise OutboxerError(f"dead letter {letter.id} has no destination to replay to")
    if handler is not None and len(handler) > _HANDLER_LENGTH:
        raise OutboxerError(
            f"dead letter {letter.id} cannot be replayed: it goes to handler "
            f"{handler[:60]!r}... ({len(handler)} characters, more than the {_HANDLER_LENGTH} "
            "an outbox row and every consumer take; were its consumer or handler columns "
            "edited?); set them back (UPDATE outboxer_dead_letter SET consumer = ..., "
            f"handler = ... WHERE id = {letter.id}), {readdress}, or delete it"
        )
    headers = {k: v for k, v in letter.headers.items() if k != FIRST_FAILED_AT}
    if letter.origin == "consumer":
        # The raw header map as delivered: keep only the application's headers.
        headers = {k: v for k, v in headers.items() if not _is_envelope_header(k)}
    return Envelope(
        message_id=letter.message_id,
        type=letter.message_type,
        destination=destination,
        payload=letter.payload,
        occurred_at=letter.occurred_at or letter.first_failed_at,
        key=letter.message_key,
        correlation_id=letter.correlation_id,
        causation_id=letter.causation_id,
        headers=headers,
        traceparent=letter.traceparent,
        tracestate=letter.tracestate,
        content_type=letter.content_type or "application/json",
        handler=handler,
        attempt=1,
    )


_HANDLER_LENGTH: int = getattr(outbox.c.target_handler.type, "length", None) or 255
"""The longest consumer:handler a replay can address (the outbox column)."""


def _check_headers(letter: DeadLetter) -> None:
    """Refuse headers no message can carry: a replay would send them to fail again."""
    fix = (
        f"set its headers to a JSON object of names to text (UPDATE outboxer_dead_letter SET "
        f"headers = '{{...}}' WHERE id = {letter.id}), or delete it"
    )
    if MALFORMED_HEADERS in letter.headers:
        raise OutboxerError(
            f"dead letter {letter.id} cannot be replayed: its headers are not a JSON object of "
            f"names to text (they are kept as the header {MALFORMED_HEADERS!r}: see "
            f"'outboxer dead-letter show {letter.id}'); {fix}"
        )
    for name, value in letter.headers.items():
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise OutboxerError(
                f"dead letter {letter.id} cannot be replayed: its header {name[:100]!r} is not "
                f"UTF-8 text (a lone surrogate), which no broker carries; {fix}"
            ) from None


def _is_envelope_header(name: str) -> bool:
    return name in wire.RESERVED or name.startswith("outboxer-")
