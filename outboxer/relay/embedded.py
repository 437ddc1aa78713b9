"""A consumer's own relay: sends the outbox rows addressed to that consumer, beside it.

A consumer's delayed retries and its dead letters' replays are outbox rows in the
consumer's database, addressed to the consumer's own destination (its name). Without a
relay on that database they would wait forever, so ``outboxer-inbox`` runs one by default:
a :class:`~outboxer.Relay` limited to ``destinations=[consumer.name]``, in a thread of its
own (:class:`OwnRelay`). It sends nothing else: the service's own messages to other
destinations are the business of ``outboxer relay``, which may run beside it.

Order per key still holds: a relay limited to destinations chooses its heads among every
destination's rows (:mod:`outboxer.store.claims`), so it never sends a row while an earlier
pending row of its key waits, whoever sends that one. Retries carry no key and never wait;
a replay keeps its key, and waits behind an earlier row of that key for another
destination until the service's relay has sent it (docs/relay.md, "Destinations").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import StaticPool

from ..errors import ConfigurationError
from ..sync_urls import sync_url
from ..transports.base import Transport
from .relay import Relay, relay_engine
from .reports import RelayStats

__all__ = ["OwnRelay", "consumer_engine"]

log = logging.getLogger("outboxer.relay")


class OwnRelay:
    """A relay for the rows addressed to ``destination``, run in a thread by :meth:`start`.

    ``on_crash`` is called (from the relay's thread) if the relay stops by itself: its
    tables vanished, or a bug; the caller decides whether the consumer goes on without it.
    """

    def __init__(
        self,
        engine: Engine,
        transport: Transport,
        destination: str,
        *,
        on_crash: Callable[[BaseException], None] | None = None,
        dispose: bool = False,
        **options: Any,
    ) -> None:
        self.relay = Relay(engine, transport, destinations=[destination], **options)
        self.destination = destination
        self.error: BaseException | None = None
        self._on_crash = on_crash
        self._dispose = dispose
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.relay.name

    def start(self) -> None:
        """Run the relay in a thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"outboxer-relay-{self.destination}", daemon=True
        )
        self._thread.start()
        # Not "started": scripts wait for the consumer's "started" line.
        log.info("relay %s sends the retries and replays of %s", self.name, self.destination)

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:
            self.error = exc
            log.error("the relay of %s's retries and replays stopped: %s", self.destination, exc)
            if self._on_crash is not None:
                self._on_crash(exc)

    def run_once(self) -> RelayStats:
        """Send what is due now, in the caller's thread (``outboxer-inbox --once``)."""
        return self.relay.run(once=True)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in flight, then end the thread (and close what it opened)."""
        self.relay.stop()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the relay of %s's retries did not stop in time", self.destination)
                return
        stats = self.relay.stats
        log.info(
            "relay %s stopped: %d sent, %d retried, %d dead-lettered",
            self.name,
            stats.sent,
            stats.retried,
            stats.dead_lettered,
        )
        if self._dispose:
            self.relay.engine.dispose()


def consumer_engine(session_factory: Callable[[], Any]) -> tuple[Engine, bool]:
    """A sync engine on the database of a consumer's ``session_factory``, for its relay;
    and whether it is a new engine (to dispose of when done).

    A new engine (:func:`~outboxer.relay.relay_engine`: a silent network fails its calls)
    keeps the relay's connections out of the handlers' pool; it is made from the URL, with
    a sync driver for an async consumer. An in-memory SQLite database exists once per
    connection, so there the consumer's own engine is used if it shares one connection
    between threads (``StaticPool``); otherwise the relay could not see the rows and
    :class:`~outboxer.errors.ConfigurationError` says so.
    """
    bind = getattr(session_factory, "kw", {}).get("bind")
    if bind is None:
        with session_factory() as session:
            bind = session.get_bind()
    if isinstance(bind, Connection):
        bind = bind.engine
    sync = getattr(bind, "sync_engine", None)  # an AsyncEngine
    engine: Engine = sync if sync is not None else bind
    url = make_url(engine.url)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        if sync is not None or not isinstance(engine.pool, StaticPool):
            raise ConfigurationError(
                "an in-memory SQLite database is not shared between threads, so a relay "
                "thread cannot send this consumer's retries: start outboxer-inbox with "
                "--no-relay, or give the engine poolclass=StaticPool"
            )
        return engine, False
    return relay_engine(sync_url(url).render_as_string(hide_password=False)), True
