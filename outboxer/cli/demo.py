"""``outboxer demo``."""

from __future__ import annotations

import logging

import click

from .. import demo as demo_module
from .common import console, option


@click.command()
@option("--verbose", is_flag=True, help="Also show the relay's and consumer's logs.")
def demo(verbose: bool) -> None:
    """Run the whole journey on an embedded SQLite database and the in-process broker."""
    logger = logging.getLogger("outboxer")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING + 5)  # the demo narrates itself
    try:
        demo_module.run(console)
    finally:
        logger.setLevel(level)  # run in-process, the demo leaves the caller's logging as it was
