"""Option values and database states a review found mishandled: durations of nan, inf or
thousands of years, an unknown --revision, tables made by create_all or by a newer
release, port 0 and IPv6 for the HTTP endpoints, and the demo's hint without otel."""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import outboxer
from outboxer import demo, schema
from outboxer.cli.health import HealthServer, serve_metrics

from .test_cli_failures import one_error_line, outboxer_cli


@pytest.fixture
def migrated_url(tmp_path: Path) -> str:
    """A SQLite file with outboxer's tables, made by the migrations."""
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    schema.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def lagging_url(migrated_url: str) -> str:
    """... with a message due for a minute."""
    engine = create_engine(migrated_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO outboxer_outbox (message_id, message_type, destination, payload, "
                "headers, content_type, occurred_at, available_at, attempts) VALUES "
                "('00000000000000000000000000000001', 't', 'd', x'7b7d', '{}', "
                "'application/json', datetime('now', '-60 seconds'), "
                "datetime('now', '-60 seconds'), 0)"
            )
        )
    engine.dispose()
    return migrated_url


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e400"])
def test_max_lag_must_be_a_finite_duration(lagging_url: str, value: str) -> None:
    flag = outboxer_cli("status", "--max-lag", value, env={"OUTBOXER_DB": lagging_url})
    assert flag.returncode == 2, flag.stdout + flag.stderr
    variable = outboxer_cli(
        "status", env={"OUTBOXER_DB": lagging_url, "OUTBOXER_STATUS_MAX_LAG": value}
    )
    assert variable.returncode == 2, variable.stdout + variable.stderr


def test_a_finite_max_lag_still_works(lagging_url: str) -> None:
    env = {"OUTBOXER_DB": lagging_url}
    assert outboxer_cli("status", "--max-lag", "10s", env=env).returncode == 9
    assert outboxer_cli("status", "--max-lag", "1h", env=env).returncode == 0


@pytest.mark.parametrize("value", ["inf", "nan", "1e12", "1e12s", "99999999w"])
def test_dead_letter_since_and_prune_older_than_refuse_impossible_durations(
    migrated_url: str, value: str
) -> None:
    for command in (
        ["dead-letter", "list", "--since", value],
        ["dead-letter", "list", "--until", value],
        ["inbox", "prune", "--older-than", value],
        ["inbox", "prune", "--dead-letters-older-than", value],
    ):
        result = outboxer_cli(*command, env={"OUTBOXER_DB": migrated_url})
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("revision", ["nope", "head+1", "-1", "0099"])
def test_an_unknown_revision_is_a_usage_error_naming_the_valid_ones(
    migrated_url: str, revision: str
) -> None:
    result = outboxer_cli(
        "db", "upgrade", "--revision", revision, env={"OUTBOXER_DB": migrated_url}
    )
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert schema.head() in line and "0001" in line, line


def test_a_known_revision_still_upgrades(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    result = outboxer_cli("db", "upgrade", "--revision", "0002", env={"OUTBOXER_DB": url})
    assert result.returncode == 0, result.stderr
    assert "upgraded from empty to 0002" in result.stdout


def test_db_current_names_tables_made_by_create_all(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dev.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    engine.dispose()
    current = outboxer_cli("db", "current", env={"OUTBOXER_DB": url})
    assert current.returncode == 0, current.stderr
    assert "create_all" in current.stdout and "behind" not in current.stdout
    upgrade = outboxer_cli("db", "upgrade", env={"OUTBOXER_DB": url})
    assert upgrade.returncode == 1, upgrade.stderr
    assert "create_all" in one_error_line(upgrade)


def test_db_current_and_upgrade_on_a_database_of_a_newer_release(migrated_url: str) -> None:
    engine = create_engine(migrated_url)
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '0999'"))
    engine.dispose()
    current = outboxer_cli("db", "current", env={"OUTBOXER_DB": migrated_url})
    assert current.returncode == 0, current.stderr
    assert "0999" in current.stdout and "newer" in current.stdout
    assert "behind" not in current.stdout
    upgrade = outboxer_cli("db", "upgrade", env={"OUTBOXER_DB": migrated_url})
    assert upgrade.returncode == 1, upgrade.stderr
    line = one_error_line(upgrade)
    assert "0999" in line and "newer" in line, line


def test_an_empty_database_is_still_reported_as_such(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    current = outboxer_cli("db", "current", env={"OUTBOXER_DB": url})
    assert current.returncode == 0
    assert "no outboxer tables" in current.stdout


def test_metrics_on_port_0_log_the_port_bound(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    with caplog.at_level(logging.INFO, logger="outboxer.cli"):
        _reader, stop = serve_metrics(("127.0.0.1", 0))
    try:
        [line] = [r.getMessage() for r in caplog.records if "metrics" in r.getMessage()]
        assert ":0/" not in line, line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200
    finally:
        stop()


def test_health_checks_serve_on_ipv6_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="outboxer.cli"):
        server = HealthServer(
            ("::1", 0), liveness=lambda: 0.1, liveness_timeout=60.0, checks=[]
        ).start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/live", timeout=5) as answer:
            assert json.load(answer)["status"] == "alive"
        assert any(f"[::1]:{server.port}" in r.getMessage() for r in caplog.records)
    finally:
        server.close()


def test_the_demo_names_the_otel_extra_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    @contextlib.contextmanager
    def no_tracing() -> Iterator[Any]:
        yield None

    monkeypatch.setattr(demo, "_tracing", no_tracing)
    logger = logging.getLogger("outboxer")
    level = logger.level
    try:
        result = outboxer_cli("demo")
    finally:
        logger.setLevel(level)  # the demo quiets outboxer's logs, process-wide
    assert result.returncode == 0, result.stderr
    assert "install outboxer[otel] to see" in result.stdout
