"""A TCP proxy for fault-injection tests: sit between a client and a real server, break the wire.

Put it in front of RabbitMQ, PostgreSQL, MariaDB or moto's HTTP server, point the client at
it, then inject a fault at the moment the test chooses. It runs an asyncio loop in one
background thread; every method below is safe from any thread (and from an ``action``
callback, which runs inside that thread) and returns once the fault is in force::

    with FaultProxy("127.0.0.1", 5672) as proxy:          # listens on 127.0.0.1:<free port>
        url = proxy.url("amqp://guest:guest@127.0.0.1:5672/")   # same URL, through the proxy
        proxy.cut()                  # cut every open connection: RST (how="fin": a clean FIN)
        proxy.cut_after(1234, DOWN)  # forward 1,234 more server->client bytes, then cut the
                                     # connection carrying them (0: the next byte; pick a
                                     # random offset with random.randrange)
        proxy.blackhole()            # connections stay open, every byte (and FIN) is dropped
        proxy.stall(5.0)             # forward nothing for 5 s, then resume (nothing is lost;
                                     # no seconds: until heal())
        proxy.delay(0.05)            # hold each chunk 50 ms before forwarding it
        proxy.refuse()               # new connections are reset as soon as they are accepted
        proxy.refuse(how="closed")   # ... or the port is not listening (connect is refused)
        proxy.down() / proxy.up()    # refuse and cut everything / accept again
        proxy.heal()                 # undo blackhole, stall, delay and refuse; disarm triggers
        fired = proxy.after(requests=2, action=proxy.cut)  # HTTP: cut once the 2nd request
                                     # went upstream, before its response comes back
        fired = proxy.after(bytes=10_000, direction=UP)    # a threading.Event
        proxy.stats                  # Stats(connections, active, refused, cuts, bytes_up, ...)

Directions: ``UP`` is client->server, ``DOWN`` server->client, ``BOTH`` either. Byte
counts of ``cut_after`` and ``after`` start when the fault is armed and add up over all
connections (most clients here hold one or two); they fire exactly at the byte boundary,
splitting a chunk if need be: the bytes before it are in the kernel's send buffer when the
action runs, the bytes after it are handled under whatever faults the action set.
``after(requests=N)`` counts HTTP/1.x requests (client->server, framed by Content-Length)
and needs ``FaultProxy(..., http=True)``. An ``action`` runs in the proxy's thread and
must be quick (set an Event, call a method of the proxy).

A proxy mirrors what its ends do: a FIN from one side is passed on as a FIN (half-close),
a reset or error on one side resets the other. ``close()`` (or leaving the ``with``) cuts
everything, stops the thread and closes every socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = ["BOTH", "DOWN", "UP", "FaultProxy", "Stats"]

Side = Literal["up", "down"]
Direction = Literal["up", "down", "both"]
UP: Side = "up"
DOWN: Side = "down"
BOTH: Direction = "both"
How = Literal["rst", "fin"]

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 65536


@dataclass
class Stats:
    """Counters since the proxy started (a snapshot)."""

    connections: int = 0  # accepted and forwarded
    active: int = 0  # open now
    refused: int = 0  # accepted and reset while refusing
    cuts: int = 0  # connections cut by a fault
    bytes_up: int = 0  # forwarded client->server
    bytes_down: int = 0  # forwarded server->client
    dropped: int = 0  # bytes swallowed by blackhole()
    requests: int = 0  # HTTP requests forwarded (http=True)


@dataclass(eq=False)
class _Trigger:
    direction: Direction
    bytes_left: int | None
    requests_left: int | None
    action: Callable[[], object] | None
    event: threading.Event
    cut: How | None = None  # cut_after: cut the connection that carried the last byte


class _HttpRequests:
    """Finds where HTTP/1.x requests end in a client->server byte stream (Content-Length)."""

    def __init__(self) -> None:
        self._head = b""
        self._body_left = 0

    def feed(self, data: bytes) -> list[int]:
        """Offsets in ``data`` just past the end of each request that ends in it."""
        ends: list[int] = []
        pos = 0
        while pos < len(data):
            if self._body_left:
                take = min(self._body_left, len(data) - pos)
                self._body_left -= take
                pos += take
                if not self._body_left:
                    ends.append(pos)
                continue
            start = len(self._head)
            self._head += data[pos:]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return ends
            consumed = end + 4 - start
            pos += consumed
            self._body_left = _content_length(self._head[: end + 4])
            self._head = b""
            if not self._body_left:
                ends.append(pos)
        return ends


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            raise NotImplementedError("faultproxy: chunked HTTP requests are not counted")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER 0: closing the socket sends RST at once instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Connection:
    """One client connection and its upstream connection, with a pump task per direction."""

    def __init__(
        self, client: asyncio.StreamWriter, server: asyncio.StreamWriter, http: bool
    ) -> None:
        self.writers: dict[Side, asyncio.StreamWriter] = {UP: server, DOWN: client}
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.eof: set[Side] = set()
        self.requests = _HttpRequests() if http else None

    def close(self, how: How) -> None:
        """Close both sockets now: RST (abort, linger 0) or FIN (flush, then close)."""
        if self.closed:
            return
        self.closed = True
        for writer in self.writers.values():
            if how == "rst":
                _reset_on_close(writer)
                writer.transport.abort()
            else:
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class FaultProxy:
    """A TCP proxy to ``host:port``, listening on 127.0.0.1 (a free port unless ``listen_port``).

    ``http=True`` counts HTTP requests, for ``after(requests=...)``. See the module
    docstring for the faults.
    """

    def __init__(self, host: str, port: int, *, http: bool = False, listen_port: int = 0) -> None:
        self.upstream = (host, port)
        self.http = http
        self._stats = Stats()
        self._connections: set[_Connection] = set()
        self._connecting: set[asyncio.StreamWriter] = set()  # accepted, upstream not yet
        self._triggers: list[_Trigger] = []
        self._blackholed: set[Side] = set()
        self._delay = 0.0
        self._refusing: Literal["reset", "closed"] | None = None
        self._listener: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._resume: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._flowing = {UP: asyncio.Event(), DOWN: asyncio.Event()}
        for flowing in self._flowing.values():
            flowing.set()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"faultproxy->{host}:{port}", daemon=True
        )
        self._thread.start()
        try:
            self.port: int = self._call(self._listen, listen_port)
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def to(cls, url: str, default_port: int, **options: Any) -> FaultProxy:
        """A proxy to the host and port of ``url`` (``default_port`` when it names none)."""
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or default_port, **options)

    # Addresses ------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: an endpoint URL (boto3's ``endpoint_url``)."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, url: str) -> str:
        """``url`` with host and port replaced by the proxy's; credentials, path, query kept."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}"))

    @property
    def stats(self) -> Stats:
        return self._call(lambda: dataclasses.replace(self._stats, active=len(self._connections)))

    # Faults -----------------------------------------------------------------------------------

    def cut(self, how: How = "rst") -> int:
        """Cut every open connection (both its ends); returns how many were cut."""
        return self._call(self._cut_all, how)

    def cut_after(
        self, nbytes: int, direction: Direction = DOWN, how: How = "rst"
    ) -> threading.Event:
        """Forward ``nbytes`` more bytes in ``direction``, then cut the connection that carried
        the last of them (0: cut the next connection that has anything to forward). Fires
        once; the returned Event is set when it has."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return self._arm(_Trigger(direction, nbytes, None, None, threading.Event(), how))

    def after(
        self,
        *,
        bytes: int | None = None,
        requests: int | None = None,
        direction: Direction = BOTH,
        action: Callable[[], object] | None = None,
    ) -> threading.Event:
        """Once ``bytes`` more bytes (in ``direction``) or ``requests`` more HTTP requests have
        been forwarded, run ``action`` (in the proxy's thread) and set the returned Event."""
        if (bytes is None) == (requests is None):
            raise ValueError("give exactly one of bytes= or requests=")
        if requests is not None and not self.http:
            raise ValueError("after(requests=...) needs FaultProxy(..., http=True)")
        if (bytes is not None and bytes < 0) or (requests is not None and requests < 1):
            raise ValueError("bytes must be >= 0 and requests >= 1")
        if requests is not None:
            direction = UP
        return self._arm(_Trigger(direction, bytes, requests, action, threading.Event()))

    def blackhole(self, direction: Direction = BOTH) -> None:
        """Keep connections open but drop every byte in ``direction``, until ``heal()``."""
        self._call(self._blackholed.update, _sides(direction))

    def stall(self, seconds: float | None = None, direction: Direction = BOTH) -> None:
        """Forward nothing in ``direction`` for ``seconds`` (None: until ``heal()``), then
        resume; the bytes wait (in the kernel's buffers), none is lost."""
        self._call(self._stall, _sides(direction), seconds)

    def delay(self, seconds: float) -> None:
        """Hold each chunk ``seconds`` before forwarding it (0: no delay)."""
        self._call(setattr, self, "_delay", max(0.0, seconds))

    def refuse(self, how: Literal["reset", "closed"] = "reset") -> None:
        """New connections fail: accepted and reset at once, or ``closed``: the port does not
        listen (connect gets ECONNREFUSED). Open connections are left alone."""
        self._call(self._refuse, how)

    def down(self, how: Literal["reset", "closed"] = "closed") -> int:
        """A server that went down: refuse new connections and cut the open ones."""
        self.refuse(how)
        return self.cut()

    def up(self) -> None:
        """Accept new connections again (on the same port)."""
        self._call(self._refuse, None)

    def heal(self) -> None:
        """Undo blackhole, stall, delay and refuse; disarm the triggers that have not fired."""
        self._call(self._heal)

    # Life cycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Cut every connection, stop listening, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        finally:
            self._stop_loop()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy 127.0.0.1:{self.port} -> {self.upstream[0]}:{self.upstream[1]}>"

    # In the loop's thread -------------------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the loop's thread (inline when already there: from an action)."""
        if threading.get_ident() == self._thread.ident:
            return fn(*args)
        if self._closed and fn is not self._listen:
            raise RuntimeError(f"{self!r} is closed")
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                result.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return result.result(timeout=30)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def _listen(self, port: int) -> int:
        """Listen now (a plain socket: connections queue in its backlog at once), and serve
        it from a task, so that this never waits and can run inside an action."""
        sock = socket.create_server(("127.0.0.1", port), backlog=128)  # SO_REUSEADDR
        self._listener = sock
        self._loop.create_task(self._serve(sock))
        return int(sock.getsockname()[1])

    async def _serve(self, sock: socket.socket) -> None:
        server = await asyncio.start_server(self._accept, sock=sock)
        if self._listener is sock:
            self._server = server
        else:  # refused (closed) or shut down while starting
            server.close()

    def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()  # removes it from the selector, then closes the socket
        elif self._listener is not None:
            # Still starting: _serve closes it. Until then it would accept, so shut its
            # accept queue now (Linux: a listening socket shut down refuses connections).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        self._server = self._listener = None

    def _refuse(self, how: Literal["reset", "closed"] | None) -> None:
        if how == "closed":
            self._unlisten()
        elif self._listener is None and not self._closed:
            self._listen(self.port)
        self._refusing = how

    def _cut_all(self, how: How) -> int:
        victims = list(self._connections)
        for connection in victims:
            self._cut(connection, how)
        for client in list(self._connecting):
            _reset_on_close(client)
            client.transport.abort()
            self._stats.cuts += 1
        cut = len(victims) + len(self._connecting)
        self._connecting.clear()
        return cut

    def _cut(self, connection: _Connection, how: How) -> None:
        if not connection.closed:
            self._stats.cuts += 1
        connection.close(how)
        self._connections.discard(connection)

    def _stall(self, sides: set[Side], seconds: float | None) -> None:
        for side in sides:
            self._flowing[side].clear()
            if side in self._resume:
                self._resume.pop(side).cancel()
            if seconds is not None:
                self._resume[side] = self._loop.call_later(seconds, self._flowing[side].set)

    def _heal(self) -> None:
        self._blackholed.clear()
        self._delay = 0.0
        for side, flowing in self._flowing.items():
            flowing.set()
            if side in self._resume:
                self._resume.pop(side).cancel()
        self._triggers.clear()
        if self._refusing is not None:
            self._refuse(None)

    def _arm(self, trigger: _Trigger) -> threading.Event:
        self._call(self._triggers.append, trigger)
        return trigger.event

    async def _shutdown(self) -> None:
        self._unlisten()
        tasks = [t for c in self._connections for t in c.tasks]
        self._cut_all("rst")
        for handle in self._resume.values():
            handle.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pending = [t for t in asyncio.all_tasks(self._loop) if t is not asyncio.current_task()]
        for task in pending:  # accepts in progress
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _accepting(self) -> bool:
        return self._refusing is None and not self._closed

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._accepting():
            self._stats.refused += 1
            _reset_on_close(writer)
            writer.transport.abort()
            return
        self._connecting.add(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), timeout=10
            )
        except (OSError, asyncio.TimeoutError):
            _reset_on_close(writer)  # the server is really down: so is the proxy
            writer.transport.abort()
            return
        finally:
            cut_meanwhile = writer not in self._connecting
            self._connecting.discard(writer)
        if cut_meanwhile or self._closed:
            _reset_on_close(up_writer)
            up_writer.transport.abort()
            writer.transport.abort()
            return
        connection = _Connection(writer, up_writer, self.http)
        for w in (writer, up_writer):
            # drain() returns only once the kernel has every byte: cuts land exactly.
            w.transport.set_write_buffer_limits(high=0)
        self._connections.add(connection)
        self._stats.connections += 1
        connection.tasks = [
            asyncio.create_task(self._pump(connection, UP, reader)),
            asyncio.create_task(self._pump(connection, DOWN, up_reader)),
        ]

    async def _pump(
        self, connection: _Connection, side: Side, reader: asyncio.StreamReader
    ) -> None:
        writer = connection.writers[side]
        try:
            while not connection.closed:
                await self._flowing[side].wait()
                data = await reader.read(CHUNK)
                if not data:
                    if side not in self._blackholed:  # a black hole swallows the FIN too
                        self._half_close(connection, side)
                    return
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._forward(connection, side, data, writer)
        except OSError:  # one end reset or failed: reset the other, as a wire would
            self._drop(connection)
        except Exception:
            log.exception("faultproxy %s: cutting a connection after an error", self)
            self._drop(connection)

    async def _forward(
        self, connection: _Connection, side: Side, data: bytes, writer: asyncio.StreamWriter
    ) -> None:
        """Forward ``data``, stopping at each trigger's byte or request boundary to fire it."""
        ends = connection.requests.feed(data) if connection.requests and side == UP else []
        pos = 0
        while True:
            self._fire(connection, side, sent=0, request_done=False)
            if connection.closed or pos >= len(data):
                return
            if not self._flowing[side].is_set():
                await self._flowing[side].wait()
                continue
            if side in self._blackholed:
                self._stats.dropped += len(data) - pos
                return
            stop = min([len(data), *(pos + left for left in self._bytes_left(side))])
            stop = min([stop, *(end for end in ends if end > pos)])
            writer.write(data[pos:stop])
            await writer.drain()
            if side == UP:
                self._stats.bytes_up += stop - pos
            else:
                self._stats.bytes_down += stop - pos
            sent, pos = stop - pos, stop
            self._fire(connection, side, sent=sent, request_done=pos in ends)

    def _bytes_left(self, side: Side) -> list[int]:
        return [
            t.bytes_left
            for t in self._triggers
            if t.bytes_left is not None and t.direction in (side, BOTH)
        ]

    def _fire(self, connection: _Connection, side: Side, *, sent: int, request_done: bool) -> None:
        if request_done:
            self._stats.requests += 1
        due: list[_Trigger] = []
        for trigger in self._triggers:
            if trigger.direction not in (side, BOTH):
                continue
            if trigger.bytes_left is not None:
                trigger.bytes_left -= sent
                if trigger.bytes_left <= 0:
                    due.append(trigger)
            elif request_done and trigger.requests_left is not None:
                trigger.requests_left -= 1
                if trigger.requests_left <= 0:
                    due.append(trigger)
        for trigger in due:
            self._triggers.remove(trigger)
            if trigger.cut is not None:
                self._cut(connection, trigger.cut)
            if trigger.action is not None:
                try:
                    trigger.action()
                except Exception:
                    log.exception("faultproxy %s: an action failed", self)
            trigger.event.set()

    def _half_close(self, connection: _Connection, side: Side) -> None:
        """The source of ``side`` sent FIN: pass it on; both sides done: the connection is over."""
        connection.eof.add(side)
        writer = connection.writers[side]
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
        if connection.eof == {UP, DOWN}:
            connection.close("fin")
            self._connections.discard(connection)

    def _drop(self, connection: _Connection) -> None:
        connection.close("rst")
        self._connections.discard(connection)


def _sides(direction: Direction) -> set[Side]:
    if direction == BOTH:
        return {UP, DOWN}
    if direction not in (UP, DOWN):
        raise ValueError(f"direction must be UP, DOWN or BOTH, got {direction!r}")
    return {direction}
