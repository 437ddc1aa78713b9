"""Helpers for tests that run outboxer's commands as processes: an application module with
a consumer on the in-process broker, free ports, polling."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

BIN = Path(sys.executable).parent
"""Where this test run's ``outboxer`` and ``outboxer-inbox`` scripts are."""

APP = """
import logging.config, os, pathlib, time
from dataclasses import dataclass
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport

{logging}

@outboxer.message("logapp.ping", destination="logapp")
@dataclass
class Ping:
    n: int

engine = create_engine(os.environ["LOGAPP_DB"])
outboxer.create_all(engine)
Session = sessionmaker(engine, class_=outboxer.OutboxSession)
consumer = outboxer.Consumer(Session, name="logapp")

@consumer.handler(Ping)
def handle(event: Ping) -> None:
    pathlib.Path(os.environ["LOGAPP_MARK"]).write_text("started")
    time.sleep(float(os.environ.get("LOGAPP_SLEEP", "0")))

# Something to consume on the in-process broker of this process.
with Session.begin() as session:
    session.publish(Ping(1))
transport = MemoryTransport(MemoryBroker.named("logapp"))
transport.receiver(consumer.subscription())
outboxer.Relay(engine, transport).run(once=True)
"""

DICT_CONFIG = """
logging.config.dictConfig({
    "version": 1,
    "formatters": {"app": {"format": "APPFORMAT %(name)s %(message)s"}},
    "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "app"}},
    "root": {"level": "INFO", "handlers": ["err"]},
})
"""


def logapp_env(tmp_path: Path, logging_setup: str = "", sleep: float = 0.0) -> dict[str, str]:
    """Write ``logapp.py`` (consumer ``logapp:consumer``, one message waiting on the broker
    ``memory://logapp`` of its process) into ``tmp_path``; returns the environment to run
    outboxer-inbox in (from ``tmp_path``)."""
    (tmp_path / "logapp.py").write_text(
        textwrap.dedent(APP).replace("{logging}", textwrap.dedent(logging_setup))
    )
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "LOGAPP_DB": f"sqlite:///{tmp_path / 'logapp.sqlite'}",
        "LOGAPP_MARK": str(tmp_path / "mark"),
        "LOGAPP_SLEEP": str(sleep),
    }


def closed_port() -> int:
    """A local port nothing listens on (free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll ``condition`` until true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def inbox_once(
    tmp_path: Path, env: dict[str, str], *options: str
) -> subprocess.CompletedProcess[str]:
    """``outboxer-inbox logapp:consumer --broker memory://logapp --once OPTIONS`` to the end."""
    return subprocess.run(
        [
            str(BIN / "outboxer-inbox"),
            "logapp:consumer",
            "--broker",
            "memory://logapp",
            "--once",
            *options,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def running(
    args: list[str], env: dict[str, str], cwd: Path, stderr: IO[Any] | int = subprocess.PIPE
) -> Iterator[subprocess.Popen[str]]:
    """A long-running command; killed on the way out if the test left it running."""
    process = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
