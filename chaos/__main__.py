"""`python -m chaos [scenario ...]`: drain through the real relay while faults hit it.

Prints, per scenario: messages published, delivered, lost, duplicated, first-delivery order
violations, and seconds to recover after each fault; writes the figures to
chaos/results/<date>.json; exits 1 when any scenario lost a message or broke per-key order.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .ledger import Figures
from .world import write_json

RESULTS = Path(__file__).parent / "results"
RECOVERY_TARGET = 5.0  # issue 8: every key sends again within 5 s of the fault's end

# name: (module, function, title, quick arguments)
SCENARIOS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "kill-rabbitmq": (
        "chaos.scenarios",
        "kill_rabbitmq",
        "relay SIGKILLed 20x during a 100,000-message drain to RabbitMQ",
        {"messages": 10_000, "kills": 3, "spacing": (0, 1500)},
    ),
    "kill-sqs": (
        "chaos.scenarios",
        "kill_sqs",
        "relay SIGKILLed 5x during a 2,000-message drain to SQS FIFO (moto)",
        {"messages": 1_000, "kills": 2, "keys": 10, "spacing": (0, 200)},
    ),
    "rabbitmq-stop": (
        "chaos.scenarios",
        "rabbitmq_stop",
        "RabbitMQ (a private node) stopped for 10 s mid-drain",
        {"messages": 20_000, "down": 5.0},
    ),
    "rabbitmq-alarm": (
        "chaos.scenarios",
        "rabbitmq_alarm",
        "RabbitMQ (a private node) blocks publishing (disk alarm) for 60 s as a drain starts",
        {"messages": 20_000, "blocked": 35.0},
    ),
    "cut-rabbitmq": (
        "chaos.scenarios",
        "cut_rabbitmq",
        "relay<->RabbitMQ connection cut 50x at random byte offsets",
        {"messages": 10_000, "cuts": 5},
    ),
    "cut-postgresql": (
        "chaos.scenarios",
        "cut_postgresql",
        "relay<->PostgreSQL connections cut 50x at random byte offsets",
        {"messages": 10_000, "cuts": 5},
    ),
    "postgresql-restart": (
        "chaos.scenarios",
        "postgresql_restart",
        "PostgreSQL (a private cluster) restarted mid-drain",
        {"messages": 20_000},
    ),
    "mariadb-restart": (
        "chaos.scenarios",
        "mariadb_restart",
        "MariaDB (a private server) restarted mid-drain",
        {"messages": 10_000},
    ),
    "mariadb-crash": (
        "chaos.scenarios",
        "mariadb_crash",
        "MariaDB (a private server) SIGKILLed mid-drain, then recovered",
        {"messages": 10_000},
    ),
    "load": (
        "chaos.load",
        "load",
        "two relays, four producer processes for 60 s",
        {"seconds": 15.0},
    ),
}

console = Console(soft_wrap=True, width=170)


def scenario(name: str) -> Callable[..., Figures]:
    module, function, _, _ = SCENARIOS[name]
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return "never" if value == float("inf") else f"{value:.1f}"


def print_table(results: list[Figures]) -> None:
    table = Table(title="outboxer chaos", title_justify="left")
    for column in (
        "scenario",
        "published",
        "delivered",
        "lost",
        "duplicated",
        "order violations",
        "faults",
        "recovery max s",
        "recovery median s",
        "took s",
        "",
    ):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for f in results:
        slow = f.recovery_max is not None and f.recovery_max > RECOVERY_TARGET
        verdict = "[red]FAIL[/]" if not f.ok else ("[yellow]slow[/]" if slow else "[green]ok[/]")
        table.add_row(
            f.scenario,
            f"{f.published:,}",
            f"{f.delivered:,}",
            str(f.lost),
            str(f.duplicated),
            str(f.order_violations),
            str(f.faults),
            seconds(f.recovery_max),
            seconds(f.recovery_median),
            f"{f.seconds:.0f}",
            verdict,
        )
    console.print(table)
    for f in results:
        for note in f.notes:
            console.print(f"  {f.scenario}: {note}")


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names", nargs="*", help=f"scenarios: {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a few faults, minutes)")
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: from the clock)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    logging.basicConfig(level=logging.WARNING)
    seed = args.seed if args.seed is not None else int(time.time())
    started = datetime.now(timezone.utc)
    path = args.results / f"{started:%Y-%m-%dT%H%M%SZ}{'-quick' if args.quick else ''}.json"
    results: list[Figures] = []
    for name in args.names or list(SCENARIOS):
        _, _, title, quick = SCENARIOS[name]
        console.rule(f"[bold]{name}[/]: {title}{' (quick)' if args.quick else ''}")
        options = {"seed": seed, **(quick if args.quick else {})}
        try:
            figures = scenario(name)(**options)
        except Exception as exc:  # one broken scenario must not hide the others' figures
            console.print_exception()
            figures = Figures(name, notes=[f"the scenario failed: {exc!r}"])
        figures.extra["options"] = options
        results.append(figures)
        print_table([figures])
        write_json(
            path,
            {
                "date": started.isoformat(timespec="seconds"),
                "commit": git_commit(),
                "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
                "seed": seed,
                "quick": args.quick,
                "scenarios": [f.as_json() for f in results],
            },
        )
    print_table(results)
    console.print(f"figures written to {path}")
    return 0 if all(f.ok for f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
