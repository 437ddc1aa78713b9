"""The short variant of `make chaos` (``python -m chaos --quick``), so that CI guards it:
the real relay command under connection cuts, a database restart and a broker stop loses
nothing, keeps the first deliveries of each key in commit order, and sends again on every
key within 5 s of each fault's end (issue 8).

Not here yet, because they miss the 5 s bound on main today (2026-11-29, 7dc9dc9), on
the loaded development machine: ``kill-rabbitmq`` (recoveries 5.1 to 5.5 s: a restarted
relay process takes seconds to boot before it sends) and ``kill-sqs`` (25.3 s: moto takes
tens of seconds per batch under load). Each runs with ``python -m chaos --quick NAME``;
add it to GUARDED below once it passes.
"""

from __future__ import annotations

import os

import pytest

from chaos.__main__ import RECOVERY_TARGET, SCENARIOS, scenario

SEED = int(os.environ.get("OUTBOXER_CHAOS_SEED", "8"))

pytestmark = pytest.mark.slow


GUARDED = [
    "cut-rabbitmq",
    "cut-postgresql",
    "postgresql-restart",
    "mariadb-restart",
    "rabbitmq-stop",
]


@pytest.mark.parametrize("name", GUARDED)
def test_the_relay_loses_nothing_keeps_key_order_and_recovers_within_5_s(name: str) -> None:
    quick = SCENARIOS[name][3]
    figures = scenario(name)(seed=SEED, **quick)
    shown = (
        f"{name} (seed {SEED}): {figures.published} published, {figures.delivered} delivered, "
        f"{figures.lost} lost, {figures.duplicated} duplicated, {figures.order_violations} order "
        f"violations, recoveries {figures.recoveries}; {'; '.join(figures.notes)}"
    )
    print(shown)
    assert figures.lost == 0 and figures.order_violations == 0, shown
    assert figures.faults > 0, shown
    assert figures.recovery_max is not None and figures.recovery_max <= RECOVERY_TARGET, shown
