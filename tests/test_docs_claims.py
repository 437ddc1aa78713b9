"""Claims the docs make about the code that a snippet alone would not catch."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import metadata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel
from sqlalchemy import create_engine, insert, text

import outboxer
from outboxer.cli import main
from outboxer.publishing import build_message
from outboxer.relay import Relay
from outboxer.testing import MemoryTransport

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/outboxer/outboxer"


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_relay_engine_is_public_and_turns_off_synchronous_commit(db_url: str) -> None:
    assert "relay_engine" in outboxer.__all__
    engine = outboxer.relay_engine(db_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW synchronous_commit")).scalar() == "off"
    finally:
        engine.dispose()


@outboxer.message("docs_claims.line_added", destination="docs-claims")
@dataclass
class LineAdded:
    order_id: int
    sku: str
    tags: list[str] = field(default_factory=list)


@outboxer.message("docs_claims.priced", destination="docs-claims")
class Priced(BaseModel):
    order_id: int
    lines: list[LineAdded]


def test_a_field_holding_the_wrong_type_is_named_with_both_types() -> None:
    """docs/publishing.md: "naming the field and both types", not pydantic's warning text."""
    with pytest.raises(outboxer.SerializationError) as caught:
        build_message(LineAdded(order_id="abc", sku="x"))  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith("cannot serialize LineAdded.order_id: expected int, got str"), message
    assert "PydanticSerializationUnexpectedValue" not in message

    nested = Priced.model_construct(order_id=1, lines=[LineAdded(1, "a"), LineAdded(2, "b", [3])])  # type: ignore[list-item]
    with pytest.raises(outboxer.SerializationError) as caught:
        build_message(nested)
    assert str(caught.value).startswith(
        "cannot serialize Priced.lines[1].tags[0]: expected str, got int"
    ), caught.value


def test_the_relay_name_defaults_to_host_and_pid_as_relay_md_says() -> None:
    relay_md = (ROOT / "docs" / "relay.md").read_text()
    row = next(line for line in relay_md.splitlines() if line.startswith("| `--name`"))
    documented = row.split("|")[2].strip()
    relay = Relay(create_engine("sqlite://"), MemoryTransport())
    host, pid = relay.name.rsplit(":", 1)
    assert (host, pid.isdigit()) == (socket.gethostname(), True)
    assert documented == "host:pid", f"relay.md documents {documented!r}; the code uses host:pid"


def test_dead_letter_show_prints_the_trace_id_as_tracing_md_shows(tmp_path: Path) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    url = f"sqlite:///{tmp_path / 'dead.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    now = datetime.now(timezone.utc)
    with engine.begin() as connection:
        connection.execute(
            insert(outboxer.dead_letter).values(
                origin="handler",
                payload=b"{}",
                traceparent=f"00-{trace_id}-00f067aa0ba902b7-01",
                error_type="ValueError",
                error_message="boom",
                attempts=1,
                first_failed_at=now,
                last_failed_at=now,
            )
        )
    engine.dispose()
    shown = CliRunner().invoke(main, ["dead-letter", "show", "1", "--db", url])
    assert shown.exit_code == 0, shown.output
    printed = re.search(r"trace id\s+(\S+)", shown.output)
    assert printed is not None and printed.group(1) == trace_id, shown.output
    tracing_md = (ROOT / "docs" / "tracing.md").read_text()
    assert f"trace id  {trace_id}" in tracing_md, "tracing.md shows another label"


def test_the_package_links_to_its_repository_and_docs_from_pypi() -> None:
    # The installed metadata: what PyPI shows beside the README (make reinstalls on change).
    urls = dict(u.split(", ", 1) for u in metadata("outboxer").get_all("Project-URL") or [])
    assert urls.get("Repository") == REPOSITORY
    assert urls.get("Documentation", "").startswith(f"{REPOSITORY}/blob/main/docs/")
    # PyPI renders README.md without the repository's files: every link must be absolute.
    readme = (ROOT / "README.md").read_text()
    relative = [
        target
        for target in re.findall(r"\]\(([^)]+)\)", readme)
        if not target.startswith(("https://", "http://", "#"))
    ]
    assert relative == [], f"relative links in README.md: {relative}"


def test_relay_md_options_table_matches_the_command() -> None:
    """Every flag, variable and numeric default in relay.md's options table is the CLI's."""
    from outboxer.cli.relay import relay as relay_command

    options: dict[str, click.Option] = {}
    for param in relay_command.params:
        if isinstance(param, click.Option):
            for flag in (*param.opts, *param.secondary_opts):
                options[flag] = param
    relay_md = (ROOT / "docs" / "relay.md").read_text()
    table = relay_md.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| `--")]
    assert len(rows) >= 10
    for first, default, _meaning in rows:
        flags = re.findall(r"`(--[a-z-]+)`", first)
        variables = re.findall(r"`(OUTBOXER_[A-Z_]+)`", first)
        for flag in flags:
            assert flag in options, f"relay.md documents {flag}, which `outboxer relay` lacks"
        for variable, flag in zip(variables, flags, strict=False):
            assert options[flag].envvar == variable, (
                f"relay.md: {flag} reads {variable}; the command reads {options[flag].envvar}"
            )
        numbers = re.findall(r"[\d,.]+", default.replace(",", ""))
        for flag, number in zip(flags, numbers, strict=False):
            if options[flag].default is not None and not isinstance(options[flag].default, bool):
                assert float(number) == float(options[flag].default), (
                    f"relay.md: {flag} defaults to {number}; the command to {options[flag].default}"
                )
