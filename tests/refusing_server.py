"""A server on 127.0.0.1 that answers every connection as a database that cannot take one
now (PostgreSQL shutting down or starting up, MariaDB with too many connections), or one
that never answers at all.

The refusal is the server's own wire message (a PostgreSQL ``ErrorResponse`` after the
startup packet; a MySQL ``ERR`` packet in place of the handshake), so the real driver
parses it and raises exactly what it raises against a real server in that state, which
a test cannot hold a real server in for long enough.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine

__all__ = ["connect_error", "refusing_mariadb", "refusing_postgresql", "silent_server"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client went away")
        data += chunk
    return data


def _postgresql(conn: socket.socket, sqlstate: str, message: str) -> None:
    while True:  # SSL and GSS requests first (answered "no"), then the startup packet
        (length,) = struct.unpack("!I", _recv_exact(conn, 4))
        body = _recv_exact(conn, length - 4)
        (code,) = struct.unpack("!I", body[:4])
        if code in (_SSL_REQUEST, _GSSENC_REQUEST):
            conn.sendall(b"N")
            continue
        break
    fields = b"".join(
        tag + value.encode() + b"\0"
        for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
    )
    payload = fields + b"\0"
    conn.sendall(b"E" + struct.pack("!I", len(payload) + 4) + payload)


def _mariadb(conn: socket.socket, errno: int, sqlstate: str, message: str) -> None:
    payload = b"\xff" + struct.pack("<H", errno) + b"#" + sqlstate.encode() + message.encode()
    conn.sendall(struct.pack("<I", len(payload))[:3] + b"\0" + payload)


@contextmanager
def _serving(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(ConnectionError, TimeoutError, struct.error):
                    answer(conn)

    thread = threading.Thread(target=serve, name="refusing-server", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()


@contextmanager
def refusing_postgresql(sqlstate: str, message: str) -> Iterator[int]:
    """The port of a "PostgreSQL" that answers each connection with FATAL ``message``."""
    with _serving(lambda conn: _postgresql(conn, sqlstate, message)) as port:
        yield port


@contextmanager
def refusing_mariadb(errno: int, sqlstate: str, message: str) -> Iterator[int]:
    """The port of a "MariaDB" that answers each connection with ERR ``errno``."""
    with _serving(lambda conn: _mariadb(conn, errno, sqlstate, message)) as port:
        yield port


@contextmanager
def silent_server() -> Iterator[int]:
    """The port of a server that accepts connections and reads, but never answers (a
    database hung on its disk, a pooler queueing its clients)."""

    def swallow(conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not done.is_set():
            try:
                if not conn.recv(4096):
                    return
            except TimeoutError:
                continue

    done = threading.Event()
    try:
        with _serving(swallow) as port:
            yield port
    finally:
        done.set()


def connect_error(url: str) -> Exception:
    """What connecting to ``url`` (one of these servers) raises."""
    engine = create_engine(url)
    try:
        engine.connect().close()
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("the refusing server let a connection in")
