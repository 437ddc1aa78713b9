"""`python -m bench [name ...]`: run the benchmarks, print their figures, write the dated
JSON under bench/results/; `python -m bench --readme` regenerates README.md's table from
the latest results."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from . import calibrate, results
from .common import Figure, console, print_figures

BENCHES = {
    "publish": ("bench.publish_overhead", "run", "Producer: publish overhead"),
    "collector": ("bench.collector", "run", "Producer: collector off, 1,000,000 messages"),
    "relay-rabbitmq": ("bench.relay", "run_rabbitmq", "Relay -> RabbitMQ throughput"),
    "relay-profile": (
        "bench.relay_profile",
        "run",
        "Relay -> RabbitMQ: where a run's wall time goes",
    ),
    "relay-sqs": ("bench.relay", "run_sqs", "Relay -> SQS throughput"),
    "latency": ("bench.relay", "run_latency", "Commit -> broker latency"),
    "share": ("bench.share", "run", "Two relays sharing a steady load"),
    "memory": ("bench.memory", "run", "Memory: relay and consumer RSS growth"),
    "aged": ("bench.aged", "run", "Relay throughput on an aged outbox table"),
    "consumer": ("bench.consumer", "run", "Consumer: inbox overhead"),
    "consumer-batch": (
        "bench.consumer_batch",
        "run",
        "Consumer: default outboxer-inbox (batching) over a hand-written pika consumer",
    ),
    "tracing": ("bench.tracing", "run", "Tracing overhead on the relay"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHES)} (default: all)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds and smaller counts (a smoke run; not used for the README)",
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="only regenerate the figures tables (README.md, docs/benchmarks.md)",
    )
    args = parser.parse_args(argv)
    if args.readme:
        results.write_readme()
        console.print("the figures tables of README.md and docs/benchmarks.md regenerated")
        return 0
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    run: dict[str, list[Figure]] = {}
    console.rule("[bold]Machine calibration (start)")
    run["calibration-start"] = calibrate.run("start")
    print_figures("Calibration", run["calibration-start"])
    for name in args.names or list(BENCHES):
        module_name, function, title = BENCHES[name]
        bench = getattr(importlib.import_module(module_name), function)
        console.rule(f"[bold]{title}")
        kwargs = {}
        if args.quick and "quick" in inspect.signature(bench).parameters:
            kwargs["quick"] = True
        elif args.quick and "rounds" in inspect.signature(bench).parameters:
            kwargs["rounds"] = 3
        try:
            figures = bench(**kwargs)
        except Exception as exc:  # one broken benchmark does not lose the others' figures
            console.print_exception()
            figures = [Figure(f"{name} failed", 0.0, "", "runs", False, f"{exc!r}"[:300])]
        print_figures(title, figures)
        run[name] = figures
    console.rule("[bold]Machine calibration (end)")
    run["calibration-end"] = calibrate.run("end")
    print_figures("Calibration", run["calibration-end"])
    path = results.save(run, argv)
    console.print(f"results written to {path.relative_to(results.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
