"""The ``outboxer`` command line.

``--db`` and ``--broker`` may come from ``OUTBOXER_DB`` / ``OUTBOXER_BROKER``; a command's
other settings from variables scoped to it (``OUTBOXER_RELAY_BATCH_SIZE``), shown by
``--help``; filters and confirmations from none (see :mod:`outboxer.cli.common`). Every
command takes ``--log-level`` and ``--log-format``, and exits with a distinct code per
kind of operator failure (:mod:`outboxer.cli.shell`, docs/operations.md).
"""

from __future__ import annotations

import click

from .common import ENV_PREFIX
from .db import db
from .dead_letter import dead_letter
from .demo import demo
from .inbox import inbox_group
from .relay import relay
from .shell import equip
from .status import status


@click.group(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "show_default": True,
    }
)
@click.version_option(package_name="outboxer")
def main() -> None:
    """outboxer: transactional outbox, relay and idempotent inbox for SQLAlchemy."""


main.add_command(db)
main.add_command(demo)
main.add_command(relay)
main.add_command(dead_letter)
main.add_command(status)
main.add_command(inbox_group)
equip(main, ENV_PREFIX)
