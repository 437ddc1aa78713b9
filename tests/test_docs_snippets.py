"""Every code block of README.md and docs/*.md runs, page by page, against the real services.

How blocks are read and run (the convention the docs follow) is in tests/docsnippets.py;
the runner is tests/docsrun.py. Each page gets a fresh directory, a fresh PostgreSQL
database, its own RabbitMQ virtual host and the session's moto SQS server, and its URLs
are rewritten to them. A page that fails prints the block (page:line) that failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from .broker_rabbitmq import rabbitmq_address
from .docsnippets import ROOT, Block, blocks, pages
from .services import IN_CI, RABBITMQ_URL, SERVERS, port_open, require

RUNNER = Path(__file__).resolve().parent / "docsrun.py"
BIN = Path(sys.executable).parent

POSTGRESQL_URL = re.compile(r"postgresql(?:\+\w+)?://[^\s\"'`)<>]+")
AMQP_URL = re.compile(r"amqp://[^\s\"'`)<>]+")
SQS_URL = re.compile(r"(?P<scheme>sqs|sns)://[^\s\"'`)<>]*")

# What the test checks after a page ran, in the page's namespace, before its background
# processes stop: what a reader would see happen.
CHECKS = {
    # The quickstart delivers the first message, with no dead letter (issue 10, item 4).
    "README.md": """
import time
from sqlalchemy import func, select
import outboxer
from myapp import Charge, engine
deadline = time.monotonic() + 60
def count(table):
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar()
while count(Charge) < 1:
    assert count(outboxer.dead_letter) == 0, "the first message was dead-lettered"
    assert time.monotonic() < deadline, "the first order was not charged within 60 s"
    time.sleep(0.2)
assert (count(outboxer.dead_letter), count(outboxer.outbox)) == (0, 0)
""",
}


def runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.kind is not None]


PAGES = [p for p in pages() if runnable(p)]


class Services:
    """The test's stand-ins for the URLs one page names, created as the page needs them."""

    def __init__(self, sqs_endpoint: str | None) -> None:
        self.sqs_endpoint = sqs_endpoint
        self.databases: list[str] = []
        self.vhosts: list[str] = []

    def database(self) -> str:
        server = SERVERS["postgresql"]
        require("postgresql", server.available, server.admin_url)
        url = server.create_database("outboxer_docs")
        self.databases.append(url)
        return url

    def rabbitmq(self) -> str:
        require("RabbitMQ", port_open(*rabbitmq_address()), "start it: rabbitmq-server -detached")
        vhost = f"outboxer-docs-{uuid.uuid4().hex[:8]}"
        for command in (
            ["add_vhost", vhost],
            ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        ):
            done = subprocess.run(
                ["rabbitmqctl", "-q", *command], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                message = f"rabbitmqctl {' '.join(command)} failed: {done.stderr.strip()}"
                if IN_CI:
                    pytest.fail(message)
                pytest.skip(message)
        self.vhosts.append(vhost)
        return f"{RABBITMQ_URL.rstrip('/')}/{quote(vhost, safe='')}"

    def sqs(self) -> str:
        """The moto server's SQS URL (an ``sns://`` URL becomes the same, as ``sns://``)."""
        assert self.sqs_endpoint is not None
        return f"sqs://?region=us-east-1&endpoint_url={self.sqs_endpoint}"

    def close(self) -> None:
        for url in self.databases:
            SERVERS["postgresql"].drop_database(url)
        for vhost in self.vhosts:
            subprocess.run(
                ["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, check=False
            )


def rewrite(code: str, urls: dict[str, str]) -> str:
    for pattern, key in ((POSTGRESQL_URL, "db"), (AMQP_URL, "amqp")):
        if key in urls:
            code = pattern.sub(urls[key], code)
    if "sqs" in urls:
        rest = urls["sqs"].removeprefix("sqs")
        code = SQS_URL.sub(lambda found: found["scheme"] + rest, code)
    return code


def run_page(page: Path, services: Services, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run one page's blocks through tests/docsrun.py in ``workdir``; its output and status."""
    steps = runnable(page)
    text = "".join(b.code for b in steps)
    urls: dict[str, str] = {}
    if POSTGRESQL_URL.search(text):
        urls["db"] = services.database()
    if AMQP_URL.search(text):
        urls["amqp"] = services.rabbitmq()
    if SQS_URL.search(text):
        urls["sqs"] = services.sqs()
    name = page.relative_to(ROOT).as_posix()
    spec = {
        "page": name,
        "steps": [
            {"kind": b.kind, "line": b.line, "title": b.title, "code": rewrite(b.code, urls)}
            for b in steps
        ],
        "check": CHECKS.get(name),
    }
    (workdir / "page").mkdir(parents=True)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(workdir / "page"),
        "PYTHONUNBUFFERED": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "COLUMNS": "200",
    }
    for variable in ("OUTBOXER_DB", "OUTBOXER_BROKER", "VIRTUAL_ENV"):
        env.pop(variable, None)  # the page sets what it needs, as a reader would
    return subprocess.run(
        [sys.executable, str(RUNNER), str(spec_path)],
        cwd=workdir / "page",
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


TEST_NAME = "test_the_code_blocks_of_the_page_run_as_written"
PARALLEL_PAGES = 3
"""Pages run at once: they mostly wait (process start-up, brokers), each on its own
database, virtual host and directory."""


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Start every selected page at once (a few in parallel); each test waits for its own."""
    selected = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", None) == TEST_NAME and hasattr(item, "callspec")
    ]
    needs_sqs = any(SQS_URL.search("".join(b.code for b in runnable(p))) for p in selected)
    endpoint = request.getfixturevalue("moto_endpoint") if needs_sqs else None
    made: list[Services] = []
    runs: dict[str, Future[subprocess.CompletedProcess[str]]] = {}
    with ThreadPoolExecutor(PARALLEL_PAGES, thread_name_prefix="docs-page") as pool:
        for page in selected:
            services = Services(endpoint)
            made.append(services)
            workdir = tmp_path_factory.mktemp(page.stem)
            runs[page.relative_to(ROOT).as_posix()] = pool.submit(run_page, page, services, workdir)
        try:
            yield runs
        finally:
            for future in runs.values():
                future.cancel()
    for services in made:
        services.close()


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_the_code_blocks_of_the_page_run_as_written(
    page: Path, page_runs: dict[str, Future[subprocess.CompletedProcess[str]]]
) -> None:
    name = page.relative_to(ROOT).as_posix()
    done = page_runs[name].result()
    assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}"
    if os.environ.get("DOCS_SNIPPETS_VERBOSE"):
        print(done.stdout)


def test_the_runner_reads_the_conventions_and_reports_the_failing_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro.\n\n"
        '```python title="helper.py"\nVALUE = 41\n```\n\n'
        "<!-- run: skip (a compose file) -->\n```bash\ndocker compose up -d\n```\n\n"
        "```python\nfrom helper import VALUE\nanswer = VALUE + 1\n```\n\n"
        "```\noutput, not run\n```\n\n"
        "```python\nassert answer == 42\nraise RuntimeError('the snippet is broken')\n```\n"
    )
    found = blocks(page)
    assert [(b.kind, b.line) for b in found] == [
        ("file", 3),
        (None, 8),
        ("python", 12),
        (None, 17),
        ("python", 21),
    ]
    assert found[1].skip == "a compose file"
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "page": "page.md",
                "steps": [
                    {"kind": b.kind, "line": b.line, "title": b.title, "code": b.code}
                    for b in found
                    if b.kind
                ],
            }
        )
    )
    workdir = tmp_path / "run"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(spec)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    # The traceback names the page and the line of the failing statement in it.
    assert 'File "page.md", line 23' in done.stdout + done.stderr, done.stdout + done.stderr
