"""The benchmark package's own code (cheap: no benchmark runs here): the dated results,
and README.md's figures table, which must be the one the latest results make."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import results
from bench.common import Figure


@pytest.mark.parametrize("page", results.TABLES, ids=lambda p: p.name)
def test_figures_tables_are_the_latest_results(page: Path) -> None:
    text = page.read_text()
    assert results.readme_section(text) == text, (
        f"{page.name}'s figures table is not the one bench/results/ makes: run "
        "`python -m bench --readme` (after `make bench`)"
    )


def test_results_are_saved_dated_and_the_latest_of_each_benchmark_is_shown(
    tmp_path: Path,
) -> None:
    old = {"relay-rabbitmq": [Figure("relay / raw", 0.5, "x", ">= 0.8x", False)]}
    first = results.save(old, ["relay-rabbitmq"], tmp_path)
    document = json.loads(first.read_text())
    assert document["command"] == "python -m bench relay-rabbitmq"
    assert document["benchmarks"]["relay-rabbitmq"][0]["value"] == 0.5
    newer = {
        "relay-rabbitmq": [Figure("relay / raw", 0.9, "x", ">= 0.8x", True)],
        "share": [Figure("relay A", 48.0, "%", ">= 35%", True)],
    }
    second = tmp_path / "2999-01-01T000000Z.json"
    results.save(newer, [], tmp_path).rename(second)
    quick = tmp_path / "2999-12-31T000000Z.json"
    results.save({"share": [Figure("relay A", 1.0, "%", ">= 35%", False)]}, ["--quick"], tmp_path)
    next(p for p in tmp_path.glob("*.json") if p not in (first, second)).rename(quick)
    table = results.table(tmp_path)
    assert "| 0.90x | ≥ 0.8x | met |" in table
    assert "0.50x" not in table
    assert "| 48% | ≥ 35% | met |" in table  # the --quick run is not the README's
    readme = f"intro\n{results.BEGIN}\nold\n{results.END}\nrest\n"
    regenerated = results.readme_section(readme, tmp_path)
    assert regenerated.startswith(f"intro\n{results.BEGIN}\n| Benchmark")
    assert regenerated.endswith(f"{results.END}\nrest\n") and "old" not in regenerated


def test_cpu_usage_counts_this_process_and_scales_per_messages() -> None:
    import os

    from bench.cpu import Usage, seconds_of, usage

    before = usage()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn 50 ms of this process's CPU
        pass
    spent = usage() - before
    assert spent.client >= 0.04
    assert seconds_of(os.getpid()) >= 0.04
    assert seconds_of(2**22 + 1) == 0.0  # above Linux's largest pid: no such process
    per = Usage(0.5, 0.25, 0.1).per(20_000)  # seconds for 20,000 -> ms per 10,000
    assert (per.broker, per.postgres, per.client) == (250.0, 125.0, 50.0)
    assert per.total == 425.0
    assert per.describe() == "broker 250, PostgreSQL 125, client 50 ms"


def test_the_ceiling_sends_the_relays_frames_and_waits_for_their_confirms() -> None:
    """``relay-rabbitmq``'s ceiling writes the relay's own frames (its encoder, properties and
    mandatory flag) on a confirming channel: the broker confirms and queues every one, with
    outboxer's envelope intact."""
    import pika

    from bench.relay import _Rabbit, envelopes
    from tests.services import port_open, require

    require("RabbitMQ", port_open("127.0.0.1", 5672))
    rabbit = _Rabbit()
    try:
        batch = envelopes(rabbit.exchange, 50)
        seconds = rabbit.ceiling(rabbit.encoded(batch), 50)
        assert seconds > 0 and rabbit.confirmed == rabbit.published == 50
        assert rabbit.depth() == 50
        method, properties, body = rabbit.channel.basic_get(rabbit.queue, auto_ack=True)
        assert method is not None and isinstance(properties, pika.BasicProperties)
        assert properties.message_id == str(batch[0].message_id)
        assert properties.headers["outboxer-key"] == "k0"
        assert body == batch[0].payload
    finally:
        rabbit.close()


def test_relay_profile_times_the_relays_steps_and_puts_them_back() -> None:
    from collections import Counter

    from bench.relay_profile import STEPS, _timed
    from outboxer.relay import pipeline

    originals = [getattr(owner, name) for owner, name, _ in STEPS]
    spent: Counter[str] = Counter()
    with _timed(spent):
        assert all(
            getattr(owner, name) is not original
            for (owner, name, _), original in zip(STEPS, originals, strict=True)
        )
        with pytest.raises(IndexError):  # an empty pipeline has nothing to land
            pipeline.Pipeline(transport=None).land()  # type: ignore[arg-type]
    assert spent["loop thread: waiting for a batch's confirms"] > 0
    assert [getattr(owner, name) for owner, name, _ in STEPS] == originals
