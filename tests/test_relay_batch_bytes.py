"""A claim is bounded in bytes as well as in rows.

A relay claimed ``batch_size`` rows (1,000) whatever their size: with messages of 1 MiB a
claim read 1 GiB into the relay, and with four batches on the wire and two claims queued
ahead, six of them. A relay in a container with a memory limit was killed by it, started
again, claimed the same rows, and was killed again: one burst of large messages stopped
the outbox for good. A claim now stops at ``batch_bytes`` of payload (4 MiB by default; a
larger message goes alone), and the rows it leaves keep their order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

import outboxer
from outboxer.store import claims
from outboxer.store.leases import LeaseScope
from outboxer.testing import MemoryBroker, MemoryTransport

from .test_relay import SessionFactory

MiB = 1024 * 1024


def publish_sized(Session: SessionFactory, sizes: list[tuple[str | None, int]]) -> list[str]:
    """One message per (key, payload size); returns their ``n`` in publish order."""
    published = []
    with Session.begin() as session:
        for n, (key, size) in enumerate(sizes):
            body = {"n": str(n), "fill": "x" * max(0, size - 30)}
            session.publish(body, type="test.sized", destination="sized", key=key)
            published.append(str(n))
    return published


RELAY_ONLY = textwrap.dedent(
    """
    import sys
    from collections.abc import Sequence
    from sqlalchemy import create_engine
    import outboxer
    from outboxer.transports.base import SendResult, Transport, TransportDescription

    class Discard(Transport):
        description = TransportDescription("memory")
        def send(self, envelopes):
            return [SendResult.sent() for _ in envelopes]

    def kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field))

    engine = create_engine(sys.argv[1])
    with engine.connect():
        pass
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak RSS starts again from here (a forked child inherits it)
    before = kib("VmRSS:")
    stats = outboxer.Relay(engine, Discard(), listen=False).run(once=True)
    print(stats.sent, (kib("VmHWM:") - before) // 1024)
    """
)


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_relay_sending_large_messages_holds_a_few_mebibytes_not_a_whole_batch(
    engine: Engine, Session: SessionFactory, db_url: str
) -> None:
    """160 messages of 1 MiB: the relay used to read all of them in one claim."""
    publish_sized(Session, [(f"k{n % 7}", MiB) for n in range(160)])
    done = subprocess.run(
        [sys.executable, "-c", RELAY_ONLY, db_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sent, grown_mib = map(int, done.stdout.split())
    assert sent == 160
    assert grown_mib < 80, f"the relay's peak RSS grew by {grown_mib} MiB for 160 MiB of rows"


def claimer(engine: Engine, max_bytes: int) -> Callable[[], list[str]]:
    """Claims as one relay does: each counts the batches claimed before as on the wire."""
    owners: list[str] = []

    def claim() -> list[str]:
        scope = LeaseScope(
            relay="r" * 16, in_flight=list(owners), dead=[], destinations=None, share=None
        )
        owners.append(f"r{len(owners)}")
        with engine.connect() as connection:
            rows = claims.claim_batch(
                connection,
                owner=owners[-1],
                scope=scope,
                limit=1000,
                lease_seconds=60,
                max_bytes=max_bytes,
            )
        return [json.loads(row.envelope.payload)["n"] for row in rows]

    return claim


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_claim_stops_at_its_bytes_and_every_key_keeps_its_order(
    engine: Engine, Session: SessionFactory
) -> None:
    # Two keys interleaved and keyless rows, 100 KiB each, and one of 1 MiB alone.
    sizes: list[tuple[str | None, int]] = [
        ("a" if n % 3 == 0 else "b" if n % 3 == 1 else None, 100 * 1024) for n in range(30)
    ]
    sizes.insert(12, ("a", MiB))
    publish_sized(Session, sizes)
    claim = claimer(engine, max_bytes=MiB)
    assert claim() == [str(n) for n in range(10)]  # ten rows of 100 KiB fit in 1 MiB
    assert claim() == ["10", "11"]  # the 1 MiB row would make it more than 1 MiB
    assert claim() == ["12"]
    rest = [n for _ in range(10) for n in claim()]
    assert rest == [str(n) for n in range(13, 31)]


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_message_larger_than_a_claims_bytes_goes_alone(
    engine: Engine, Session: SessionFactory
) -> None:
    publish_sized(Session, [("a", 2 * MiB), (None, 1000), ("a", 1000)])
    claim = claimer(engine, max_bytes=MiB)
    assert claim() == ["0"]
    assert claim() == ["1", "2"]


@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)
def test_a_relay_sends_large_messages_in_order_through_byte_bounded_batches(
    engine: Engine, Session: SessionFactory
) -> None:
    sizes: list[tuple[str | None, int]] = [(f"k{n % 3}", 300 * 1024) for n in range(40)]
    published = publish_sized(Session, sizes)
    broker = MemoryBroker()
    stats = outboxer.Relay(engine, MemoryTransport(broker), batch_bytes=MiB).run(once=True)
    assert stats.sent == 40
    assert stats.batches >= 13  # three 300 KiB messages a batch at most
    got = [json.loads(e.payload)["n"] for e in broker.messages()]
    for key in ("k0", "k1", "k2"):
        mine = [n for n in published if f"k{int(n) % 3}" == key]
        assert [n for n in got if n in mine] == mine
    with engine.connect() as connection:
        assert connection.execute(select(outboxer.outbox.c.id)).first() is None
