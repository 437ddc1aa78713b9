"""``outboxer status``: backlog, oldest pending age, dead letters, inbox size."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ..store import dead_letters as dead_letter_store
from ..store import inbox as inbox_store
from ..store import relay as relay_store
from .common import console, db_option, make_engine, option, safe_url


@click.command()
@db_option()
@option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(db_url: str, as_json: bool) -> None:
    """Show the outbox backlog, the oldest due message's age, dead letters and inbox size."""
    engine = make_engine(db_url)
    try:
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
    if as_json:
        click.echo(json.dumps(figures))
        return
    table = Table(title=f"outboxer status: {safe_url(db_url)}", show_header=False)
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
