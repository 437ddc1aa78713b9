"""``outboxer status``: backlog, oldest pending age, dead letters, inbox size."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ..secrets import mask_url
from ..store import dead_letters as dead_letter_store
from ..store import inbox as inbox_store
from ..store import relay as relay_store
from ..store.schema import require_tables
from .common import Duration, console, db_option, err_console, make_engine, option, setting
from .shell import LAG_EXCEEDED


@click.command()
@db_option()
@option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@setting(
    "--max-lag",
    type=Duration(),
    default=None,
    metavar="SECONDS",
    help="Exit 9 when the oldest due message has waited longer than this (90, 30s, 5m): "
    "a check for cron or a probe.",
)
def status(db_url: str, as_json: bool, max_lag: float | None) -> None:
    """Show the outbox backlog, the oldest due message's age, dead letters and inbox size."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            require_tables(connection)
        with engine.connect() as connection:
            backlog = relay_store.backlog(connection)
            with connection.begin():
                dead = dead_letter_store.count_dead_letters(connection)
                inbox_rows = inbox_store.count_inbox(connection)
    finally:
        engine.dispose()
    figures = {
        "outbox_pending": backlog.pending,
        "outbox_due": backlog.due,
        "outbox_leased": backlog.leased,
        "oldest_due_seconds": round(backlog.oldest_due_seconds, 3),
        "dead_letters": sum(dead.values()),
        "dead_letters_by_origin": dead,
        "inbox_rows": inbox_rows,
    }
    lagging = max_lag is not None and backlog.oldest_due_seconds > max_lag
    if as_json:
        click.echo(json.dumps(figures if max_lag is None else {**figures, "lag_exceeded": lagging}))
    else:
        table = Table(title=f"outboxer status: {mask_url(db_url)}", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("outbox: pending", str(backlog.pending))
        table.add_row("outbox: due now", str(backlog.due))
        table.add_row("outbox: being sent (leased)", str(backlog.leased))
        table.add_row("oldest due message waiting", f"{backlog.oldest_due_seconds:.1f} s")
        by_origin = ", ".join(f"{k} {v}" for k, v in sorted(dead.items()))
        table.add_row("dead letters", f"{sum(dead.values())}" + (f" ({by_origin})" if dead else ""))
        table.add_row("inbox rows", str(inbox_rows))
        console.print(table)
    if lagging:
        err_console.print(
            f"the oldest due message has waited {backlog.oldest_due_seconds:.1f} s, more than "
            f"--max-lag {max_lag:g} s: is a relay running, and can it reach the broker?"
        )
        raise click.exceptions.Exit(LAG_EXCEEDED)
