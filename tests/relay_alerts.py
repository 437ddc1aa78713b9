"""An ``outboxer relay --on-failure`` target for tests: records what it is given."""

from __future__ import annotations

import outboxer

received: list[outboxer.SendFailure] = []


def undeliverable(failure: outboxer.SendFailure) -> None:
    received.append(failure)


not_a_function = 42
