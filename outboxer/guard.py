"""The handler's session while the handler runs: ``commit()`` and ``rollback()`` refused.

outboxer commits a handler's session, with its inbox row, when the handler returns; a
handler that committed or rolled back itself would split the inbox row from its work.
Either call raises :class:`~outboxer.errors.HandlerSessionError` (dead-lettered at once).
"""

from __future__ import annotations

from typing import Any

from .errors import HandlerSessionError
from .handlers import HandlerSpec

__all__ = ["guarded"]


class guarded:
    """While the handler runs, its session refuses ``commit()`` and ``rollback()``."""

    def __init__(self, session: Any, spec: HandlerSpec) -> None:
        self.session = session
        self.spec = spec

    def __enter__(self) -> None:
        handler = self.spec.id

        def commit() -> None:
            raise HandlerSessionError(
                f"handler {handler} called session.commit(): outboxer commits the handler's "
                "session, with its inbox row, when the handler returns; remove the commit "
                "(use session.flush() to send the writes early)"
            )

        def rollback() -> None:
            raise HandlerSessionError(
                f"handler {handler} called session.rollback(): raise an exception instead "
                "(the run is rolled back and retried), or use session.begin_nested() for a "
                "part that may fail on its own"
            )

        # Instance attributes: they shadow the methods for this session only.
        setattr(self.session, "commit", commit)  # noqa: B010
        setattr(self.session, "rollback", rollback)  # noqa: B010

    def __exit__(self, *exc: object) -> None:
        vars(self.session).pop("commit", None)
        vars(self.session).pop("rollback", None)
