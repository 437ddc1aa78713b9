"""The ``outboxer`` command line.

Every option can also be set with an ``OUTBOXER_<OPTION>`` environment variable
(``--db`` from ``OUTBOXER_DB``, ``--batch-size`` from ``OUTBOXER_BATCH_SIZE``); ``--help``
shows which.
"""

from __future__ import annotations

import click

from .common import configure_logging
from .db import db
from .dead_letter import dead_letter
from .demo import demo
from .inbox import inbox_group
from .relay import relay
from .status import status


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--log-level",
    default="INFO",
    envvar="OUTBOXER_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging verbosity.",
)
@click.version_option(package_name="outboxer")
def main(log_level: str) -> None:
    """outboxer: transactional outbox, relay and idempotent inbox for SQLAlchemy."""
    configure_logging(log_level)


main.add_command(db)
main.add_command(demo)
main.add_command(relay)
main.add_command(dead_letter)
main.add_command(status)
main.add_command(inbox_group)
