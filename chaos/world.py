"""The pieces a scenario is made of: throwaway databases, producers, `outboxer relay`
processes (the real command, killed and restarted at will), and the outbox's backlog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

import outboxer

OUTBOXER = str(Path(sys.executable).parent / "outboxer")
PG_SERVER = os.environ.get("OUTBOXER_CHAOS_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RABBITMQ_URL = os.environ.get("OUTBOXER_CHAOS_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
MESSAGE_TYPE = "chaos.sequenced"


@contextmanager
def fresh_database(server: str = PG_SERVER) -> Iterator[str]:
    """A new PostgreSQL database with the outboxer tables; dropped afterwards."""
    admin = create_engine(server, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"outboxer_chaos_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        engine = create_engine(url)
        outboxer.create_all(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def publish(
    db_url: str,
    destination: str,
    total: int,
    keys: int,
    *,
    prefix: str = "k",
    start: int = 0,
    per_tx: int = 1000,
) -> dict[str, int]:
    """Commit ``total`` messages over ``keys`` keys; returns how many each key got."""
    engine = create_engine(db_url)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    counts: dict[str, int] = {}
    try:
        for first in range(start, start + total, per_tx):
            with Session.begin() as session:
                for n in range(first, min(first + per_tx, start + total)):
                    publish_one(session, destination, counts, f"{prefix}{n % keys}", n)
    finally:
        engine.dispose()
    return counts


def publish_one(
    session: outboxer.OutboxSession, destination: str, counts: dict[str, int], key: str, n: int
) -> None:
    """Publish message ``n`` as the next of ``key`` (``counts`` counts them per key)."""
    seq = counts.get(key, 0)
    counts[key] = seq + 1
    session.publish(
        {"key": key, "seq": seq, "n": n}, type=MESSAGE_TYPE, destination=destination, key=key
    )


def backlog(db_url: str) -> int:
    """Rows still in the outbox."""
    engine = create_engine(db_url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(outboxer.outbox)).scalar_one())
    finally:
        engine.dispose()


class RelayProcess:
    """One ``outboxer relay`` process; its log goes to a file (a pipe would fill and block)."""

    def __init__(self, db_url: str, broker_url: str, *args: str, name: str = "relay") -> None:
        self.command = [OUTBOXER, "relay", "--db", db_url, "--broker", broker_url, *args]
        self.name = name
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (kept for the whole run)
            "w+", prefix=f"chaos-{name}-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.starts = 0

    def start(self) -> float:
        """Start (again); returns the time.monotonic() of the start."""
        self.log.write(f"\n==== start {self.starts + 1} ====\n")
        self.log.flush()
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=self.log, env=relay_environment()
        )
        self.starts += 1
        self.started_at = time.monotonic()
        return self.started_at

    def kill(self) -> float:
        """SIGKILL; returns when it is dead."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        return time.monotonic()

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop. Returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    def check_alive(self) -> None:
        """RuntimeError, with the end of its log, when the process exited on its own (a
        scenario would otherwise wait its whole timeout for deliveries that cannot come)."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited on its own with status {self.process.returncode}; "
                f"the end of its log:\n{self.logged()[-3000:]}"
            )

    def rss_mib(self) -> float:
        """Resident memory of the process now, in MiB."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return kib / 1024

    def logged(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")


def relay_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment.setdefault("AWS_ACCESS_KEY_ID", "testing")
    environment.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    environment.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return environment


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
