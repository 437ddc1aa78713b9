"""The benchmark package's own code (cheap: no benchmark runs here): the dated results,
and README.md's figures table, which must be the one the latest results make."""

from __future__ import annotations

import json
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
