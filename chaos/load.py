"""Two relays and four producer processes for a minute: nothing lost, keys in order, and
the relays' resident memory at the start and at the end.

``python -m chaos.load produce DB_URL DESTINATION PREFIX SECONDS OUT`` is one producer:
it commits transactions of 1 to 10 messages over 25 keys of its own (``PREFIX`` + n) for
``SECONDS``, then writes how many messages each key got to the JSON file ``OUT``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .collectors import RabbitCollector
from .drain import Drain
from .ledger import Figures, Ledger
from .world import RABBITMQ_URL, RelayProcess, fresh_database, publish_one, write_json

PRODUCER_KEYS = 25


def produce(db_url: str, destination: str, prefix: str, seconds: float, out: Path) -> None:
    engine = create_engine(db_url)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    rng = random.Random(prefix)
    counts: dict[str, int] = {}
    n = int(prefix.strip("p-") or 0) * 10_000_000
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with Session.begin() as session:
            for _ in range(rng.randint(1, 10)):
                key = f"{prefix}{rng.randrange(PRODUCER_KEYS)}"
                publish_one(session, destination, counts, key, n)
                n += 1
        time.sleep(rng.uniform(0, 0.01))
    engine.dispose()
    write_json(out, counts)


def load(seconds: float = 60.0, producers: int = 4, relays: int = 2, seed: int = 0) -> Figures:
    """``relays`` relay processes drain what ``producers`` processes commit for ``seconds``."""
    destination = f"chaos-load-{uuid.uuid4().hex[:6]}"
    ledger = Ledger()
    collector = RabbitCollector(RABBITMQ_URL, destination, ledger)
    workdir = Path(tempfile.mkdtemp(prefix="outboxer-chaos-load-"))
    try:
        with fresh_database() as db:
            drain = Drain("load", db, destination, {}, ledger)
            for i in range(relays):
                process = RelayProcess(db, RABBITMQ_URL, "--name", f"chaos-{i}", name=f"relay-{i}")
                drain.relays.append(process)
                process.start()
            outs = [workdir / f"p{i}.json" for i in range(producers)]
            running = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "chaos.load",
                        "produce",
                        db,
                        destination,
                        f"p{i}-",
                        str(seconds),
                        str(out),
                    ]
                )
                for i, out in enumerate(outs)
            ]
            time.sleep(min(5.0, seconds / 4))
            rss_start = [round(r.rss_mib(), 1) for r in drain.relays]
            for producer in running:
                producer.wait(timeout=seconds + 120)
            rss_end = [round(r.rss_mib(), 1) for r in drain.relays]
            for out in outs:
                drain.expected.update(json.loads(out.read_text()))
            figures = drain.finish(rss_start_mib=rss_start, rss_end_mib=rss_end)
            figures.notes.append(f"relay RSS MiB at start {rss_start}, at end {rss_end}")
            return figures
    finally:
        collector.close()


if __name__ == "__main__" and sys.argv[1:2] == ["produce"]:
    db_url, destination, prefix, seconds, out = sys.argv[2:7]
    produce(db_url, destination, prefix, float(seconds), Path(out))
