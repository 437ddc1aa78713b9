"""What committed transactions published: a recorder for tests.

:class:`Published` listens to every ORM session (sync, and the sync session inside each
``AsyncOutboxSession``) while it records: the session notes every message it writes to the
outbox (at commit, or as it goes with the collector off), a rolled-back savepoint or
transaction drops its own from the notes, and what is noted when the outermost transaction
commits is what that commit stored. Core's ``outboxer.publish(connection, ...)`` writes at
once, outside any session, and is not seen.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from typing import Any, TypeVar, overload

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from ..collector import RECORDED, Pending, inside, session_state
from ..message import Envelope, message_type_for
from ..session import OutboxMixin

__all__ = ["Published"]

T = TypeVar("T")


class Published:
    """Messages stored by commits while recording: ``with Published() as published: ...``.

    ``published.envelopes`` lists them in commit order; :meth:`events` decodes those of one
    type; :meth:`one` and :meth:`assert_published` state what a test expects.
    """

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        """Every message committed while recording, in commit order."""
        self._lock = threading.Lock()
        self._listening = False
        self._recorded = False  # started at least once: an empty record means something

    # Recording --------------------------------------------------------------------------

    def start(self) -> Published:
        """Listen to every session's commits (until :meth:`stop`)."""
        if not self._listening:
            event.listen(Session, "after_begin", self._after_begin)
            # insert=True: before outboxer's own hook, which writes the kept messages.
            event.listen(Session, "before_commit", self._before_commit, insert=True)
            event.listen(Session, "after_commit", self._after_commit)
            event.listen(Session, "after_soft_rollback", self._after_soft_rollback)
            self._listening = True
            self._recorded = True
        return self

    def stop(self) -> None:
        if self._listening:
            event.remove(Session, "after_begin", self._after_begin)
            event.remove(Session, "before_commit", self._before_commit)
            event.remove(Session, "after_commit", self._after_commit)
            event.remove(Session, "after_soft_rollback", self._after_soft_rollback)
            self._listening = False

    def __enter__(self) -> Published:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def clear(self) -> None:
        """Forget what was recorded so far (to assert on what comes next)."""
        with self._lock:
            self.envelopes.clear()

    def _after_begin(self, session: Session, *_: object) -> None:
        # Before the transaction's first write: every write needs a connection.
        if isinstance(session, OutboxMixin):
            session_state(session).setdefault(RECORDED, [])

    def _before_commit(self, session: Session) -> None:
        # A transaction begun before recording started: at least its commit's write.
        if isinstance(session, OutboxMixin) and session.get_nested_transaction() is None:
            session_state(session).setdefault(RECORDED, [])

    def _after_soft_rollback(self, session: Session, rolled_back: SessionTransaction) -> None:
        # A SAVEPOINT or the whole transaction: the rows it wrote are gone.
        written: list[Pending] | None = session_state(session).get(RECORDED)
        if written and (rolled_back.nested or rolled_back.parent is None):
            written[:] = [p for p in written if not inside(p.transaction, rolled_back)]

    def _after_commit(self, session: Session) -> None:
        if not isinstance(session, OutboxMixin) or session.get_nested_transaction() is not None:
            return  # a SAVEPOINT released: its messages are stored only if the commit is
        stored = [p.message.envelope for p in session_state(session).get(RECORDED, ())]
        if stored:
            with self._lock:
                self.envelopes.extend(stored)

    # Asserting --------------------------------------------------------------------------

    @property
    def types(self) -> list[str]:
        """The type names of the recorded messages, in order."""
        return [e.type for e in self.envelopes]

    @overload
    def events(self, message: type[T]) -> list[T]: ...

    @overload
    def events(self, message: str) -> list[Any]: ...

    def events(self, message: type[T] | str) -> list[T] | list[Any]:
        """The recorded messages of one type, decoded: instances of a registered class, or
        (for a type name) its payloads as JSON values."""
        if isinstance(message, str):
            return [json.loads(e.payload) for e in self.envelopes if e.type == message]
        message_type = message_type_for(message)
        return [
            message_type.decode(e.payload) for e in self.envelopes if e.type == message_type.name
        ]

    def of(self, message: type[Any] | str) -> list[Envelope]:
        """The envelopes (id, key, headers, destination...) of one type."""
        name = message if isinstance(message, str) else message_type_for(message).name
        return [e for e in self.envelopes if e.type == name]

    def one(self, message: type[T]) -> T:
        """The single recorded message of this type; AssertionError when there are 0 or more."""
        self._check_recorded()
        found = self.events(message)
        assert len(found) == 1, (
            f"expected one {message.__qualname__} to be published, got {len(found)}: {found}"
        )
        return found[0]

    def assert_published(
        self,
        message: type[Any] | str,
        *,
        count: int | None = None,
        key: str | int | None = None,
        destination: str | None = None,
        **fields: Any,
    ) -> list[Envelope]:
        """Assert that messages of this type were published, matching the envelope's
        ``key`` (a str, or an int as publish() takes it) and ``destination`` and the payload
        ``fields`` given; returns the matches. ``count`` asks for exactly that many (0:
        none). A field the message type does not have fails, naming the fields it has."""
        self._check_recorded()
        name = message if isinstance(message, str) else message_type_for(message).name
        wanted_key = None if key is None else str(key)
        candidates = list(self._decoded(message))
        _check_fields(message, fields, [payload for _, payload in candidates])
        matches = [
            envelope
            for envelope, payload in candidates
            if (wanted_key is None or envelope.key == wanted_key)
            and (destination is None or envelope.destination == destination)
            and all(_field(payload, f) == v for f, v in fields.items())
        ]
        asked = {"key": wanted_key, "destination": destination}
        wanted = ", ".join(
            [f"{k}={v!r}" for k, v in asked.items() if v is not None]
            + [f"{k}={v!r}" for k, v in fields.items()]
        )
        wanted = f"{name} with {wanted}" if wanted else name
        if count is None:
            assert matches, f"no {wanted} was published; {self._shown(name, candidates)}"
        else:
            assert len(matches) == count, (
                f"expected {count} {wanted}, got {len(matches)}; {self._shown(name, candidates)}"
            )
        return matches

    def _check_recorded(self) -> None:
        assert self._recorded, (
            "this Published never recorded: use `with Published() as published:` around the "
            "code under test (or published.start()), or the outboxer_published fixture"
        )

    def _shown(self, name: str, candidates: list[tuple[Envelope, Any]], limit: int = 10) -> str:
        """What was published, for an assertion's message: the messages of type ``name``
        (key, destination, payload), or else the types published."""
        if not candidates:
            return f"no {name} at all; published: {self.types}"
        shown = [
            f"key={envelope.key!r} destination={envelope.destination!r} {payload!r}"
            for envelope, payload in candidates[:limit]
        ]
        more = f" and {len(candidates) - limit} more" if len(candidates) > limit else ""
        return f"published {name}: " + "; ".join(shown) + more

    def _decoded(self, message: type[Any] | str) -> Iterator[tuple[Envelope, Any]]:
        envelopes = self.of(message)
        if isinstance(message, str):
            payloads: list[Any] = self.events(message)
        else:
            payloads = self.events(message)
        return zip(envelopes, payloads, strict=True)


def _check_fields(message: type[Any] | str, fields: dict[str, Any], payloads: list[Any]) -> None:
    """An AssertionError for a field name the message type lacks (a typo would otherwise
    compare the missing value, None, and could match)."""
    if not fields:
        return
    if isinstance(message, type):
        known = _field_names(message)
    else:  # dicts: the keys the published payloads have
        known = sorted({k for p in payloads if isinstance(p, dict) for k in p})
        if not payloads:
            return  # nothing published to know the fields from: the assertion fails anyway
    unknown = [f for f in fields if f not in known]
    assert not unknown, (
        f"{message if isinstance(message, str) else message.__qualname__} has no field "
        f"{unknown[0]!r} (its fields: {', '.join(known)})"
    )


def _field_names(cls: type[Any]) -> list[str]:
    """The fields of a dataclass or pydantic model (its annotations otherwise)."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    model_fields = getattr(cls, "model_fields", None)
    if isinstance(model_fields, dict):
        return list(model_fields)
    return list(getattr(cls, "__annotations__", {}))


def _field(payload: Any, name: str) -> Any:
    if isinstance(payload, dict):
        return payload.get(name)
    return getattr(payload, name, None)
