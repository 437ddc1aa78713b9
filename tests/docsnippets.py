"""The code blocks of README.md and docs/*.md, read the way tests/test_docs_snippets.py runs them.

The convention (also in docs/index.md and the team notes):

* A page runs top to bottom, in a fresh directory, as one reader would follow it:
  ``python`` blocks share one namespace in order (one interpreter per page), ``bash``/``sh``
  blocks run in that directory, and variables they ``export`` hold for the later blocks.
* ```` ```python title="myapp/consumers.py" ```` (any language): the block is that file's
  content; it is written, not run, so later blocks can import or use it.
* ``<!-- run: skip (reason) -->`` on the line before a block: the block is not run (a
  ``docker compose`` command, ``make test`` itself). Say why in the parentheses.
* Blocks in other languages, or none (output, diagrams), are not run.
* In shell blocks, ``outboxer relay`` and ``outboxer-inbox`` without ``--once`` (and any
  command ending in ``&``) are long-running: they are started in the background, the page
  goes on once they log that they started, and they are stopped when the page ends.
  ``pip install`` lines are not run (the tests run the checkout's own package).
* Database and broker URLs (``postgresql+psycopg://...``, ``amqp://...``, ``sqs://...``,
  ``sns://...``) are replaced with a fresh database, a RabbitMQ virtual host and the moto
  server (SQS and SNS) of the test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNNABLE = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
_SKIP = re.compile(r"<!--\s*run:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
_TITLE = re.compile(r"""title=["']?(?P<title>[^"'\s]+)["']?""")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int
    """1-based line of the opening fence."""
    language: str
    code: str
    title: str | None = None
    """The file this block is the content of (``title="path"``)."""
    skip: str | None = None
    """Why the block is not run (``<!-- run: skip (why) -->``)."""

    @property
    def kind(self) -> str | None:
        """What the runner does: "file", "python", "shell", or None (not run)."""
        if self.skip is not None:
            return None
        if self.title is not None:
            return "file"
        return RUNNABLE.get(self.language)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    page = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            body.append(lines[end][len(opening["indent"]) :])
            end += 1
        previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        skip = _SKIP.search(previous)
        title = _TITLE.search(info)
        found.append(
            Block(
                page=page,
                line=index + 1,
                language=info.split()[0].lower() if info else "",
                code="\n".join(body) + "\n",
                title=title["title"] if title else None,
                skip=skip["reason"].strip() if skip else None,
            )
        )
        index = end + 1
    return found


def pages() -> list[Path]:
    """README.md and every page of docs/, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def file_block(page: Path, title: str) -> Block:
    """The block of ``page`` that is the content of the file ``title``."""
    for block in blocks(page):
        if block.title == title:
            return block
    raise LookupError(f"{page.name} has no block with title={title!r}")
