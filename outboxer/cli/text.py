"""Counting words right in what the command line prints."""

from __future__ import annotations

__all__ = ["plural"]


def plural(count: int, singular: str, many: str | None = None) -> str:
    """``1 batch``, ``2 batches``, ``0 messages``: the count with the word that fits it."""
    return f"{count} {singular if count == 1 else (many or singular + 's')}"
