"""A broker that cannot be told (an acknowledgement or a visibility extension failing while
it drops) is an expected failure: one warning line naming the error, the traceback only at
debug level. Old code logged a traceback at WARNING for every delivery."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from outboxer import runner


class _Dropped:
    def extend(self, seconds: float) -> None:
        raise ConnectionResetError("the broker went away")


def _refused() -> None:
    raise ConnectionResetError("the broker went away")


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: runner._settle(_refused), "could not settle"),
        (lambda: runner._extend_all([_Dropped()], 30.0), "could not extend"),  # type: ignore[list-item]
    ],
    ids=["acknowledge", "extend"],
)
def test_a_broker_that_cannot_be_told_is_one_warning_line(
    call: Any, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="outboxer"):
        call()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [words in r.getMessage() for r in warnings] == [True], caplog.text
    assert warnings[0].exc_info is None, "a traceback at WARNING"
    assert "ConnectionResetError: the broker went away" in warnings[0].getMessage()
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)
