"""`python -m bench [name ...]`: run the benchmarks and print their figures."""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import console, print_figures

BENCHES = {
    "publish": ("bench.publish_overhead", "run", "Producer: publish overhead"),
    "collector": ("bench.collector", "run", "Producer: collector off, 1,000,000 messages"),
    "relay-rabbitmq": ("bench.relay", "run_rabbitmq", "Relay -> RabbitMQ throughput"),
    "relay-sqs": ("bench.relay", "run_sqs", "Relay -> SQS throughput"),
    "latency": ("bench.relay", "run_latency", "Commit -> broker latency"),
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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHES)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    for name in args.names or list(BENCHES):
        module_name, function, title = BENCHES[name]
        run = getattr(importlib.import_module(module_name), function)
        console.rule(f"[bold]{title}")
        figures = run(
            **({"rounds": 3} if args.quick and "rounds" in run.__code__.co_varnames else {})
        )
        print_figures(title, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
