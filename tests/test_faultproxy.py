"""The fault proxy does what it says: first on a local echo server, byte for byte, then in
front of the real RabbitMQ, PostgreSQL, MariaDB and moto, as their clients see it."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from .faultproxy import DOWN, UP, FaultProxy


class EchoServer:
    """Sends back what it receives; remembers every byte each connection received."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.received: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            got = bytearray()
            self.received.append(got)
            self.sockets.append(conn)
            thread = threading.Thread(target=self._echo, args=(conn, got), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket, got: bytearray) -> None:
        try:
            while data := conn.recv(65536):
                got.extend(data)
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepting.join(5)
        for conn in self.sockets:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as made:
        yield made


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def established(proxy: FaultProxy) -> socket.socket:
    """A connection the proxy has accepted and forwarded (connect alone returns before)."""
    sock = connect(proxy)
    sock.sendall(b"?")
    assert sock.recv(1) == b"?"
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the peer sends, and how it ended: ``eof``, ``reset`` or ``timeout``."""
    got = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return bytes(got), "reset"
        except TimeoutError:
            return bytes(got), "timeout"
        if not data:
            return bytes(got), "eof"
        got.extend(data)


def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# On a local echo server ----------------------------------------------------------------------


def test_bytes_pass_both_ways_and_are_counted(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"x" * 100_000)
        got = b""
        while len(got) < 100_000:
            got += sock.recv(65536)
    wait_for(lambda: proxy.stats.active == 0)
    stats = proxy.stats
    assert (stats.connections, stats.bytes_up, stats.bytes_down) == (1, 100_000, 100_000)


@pytest.mark.parametrize("offset", [0, 1, 4095, 9999, 10_000, "random"])
def test_a_cut_after_n_bytes_down_delivers_exactly_n_then_resets(
    proxy: FaultProxy, offset: int | str
) -> None:
    n = random.randrange(10_000) if offset == "random" else int(offset)
    fired = proxy.cut_after(n, DOWN)
    with connect(proxy) as sock:
        sock.sendall(os.urandom(10_000))
        if n == 10_000:  # the last byte: the cut comes with the next byte to go down
            sock.sendall(b"more")
        got, end = read_until_closed(sock)
    assert (len(got), end) == (n, "reset")
    assert fired.is_set() and proxy.stats.cuts == 1


@pytest.mark.parametrize("n", [0, 1, 777])
def test_a_cut_after_n_bytes_up_lets_the_server_see_exactly_n(
    proxy: FaultProxy, echo: EchoServer, n: int
) -> None:
    proxy.cut_after(n, UP)
    with connect(proxy) as sock:
        sock.sendall(b"y" * 1000)
        got, end = read_until_closed(sock)
    assert end == "reset" and len(got) <= n
    wait_for(lambda: len(echo.received) == 1)
    time.sleep(0.1)  # anything more in flight would have arrived
    assert len(echo.received[0]) == n


def test_a_cut_counts_bytes_from_when_it_is_armed_over_all_connections(proxy: FaultProxy) -> None:
    first, second = connect(proxy), connect(proxy)
    first.sendall(b"a" * 10)
    assert first.recv(100) == b"a" * 10
    proxy.cut_after(15, DOWN)
    first.sendall(b"b" * 10)
    assert first.recv(100) == b"b" * 10
    second.sendall(b"c" * 10)
    got, end = read_until_closed(second)
    assert (got, end) == (b"c" * 5, "reset")
    first.sendall(b"d")  # only the connection carrying the 15th byte was cut
    assert first.recv(100) == b"d"
    first.close()
    second.close()


def test_cut_resets_every_connection_or_closes_them_cleanly(proxy: FaultProxy) -> None:
    socks = [established(proxy) for _ in range(50)]
    assert proxy.cut() == 50
    assert {read_until_closed(sock)[1] for sock in socks} == {"reset"}
    fins = [established(proxy) for _ in range(3)]
    assert proxy.cut(how="fin") == 3
    assert {read_until_closed(sock)[1] for sock in fins} == {"eof"}
    for sock in socks + fins:
        sock.close()
    assert proxy.stats.cuts == 53


def test_a_cut_during_the_handshake_fails_the_client_and_the_next_connection_works(
    proxy: FaultProxy,
) -> None:
    proxy.cut_after(0, UP)  # the client's very first byte
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert read_until_closed(sock) == (b"", "reset")
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert sock.recv(10) == b"hello"


def test_blackhole_keeps_the_connection_but_drops_bytes_until_healed(proxy: FaultProxy) -> None:
    with connect(proxy, timeout=0.5) as sock:
        proxy.blackhole()
        sock.sendall(b"lost")
        assert read_until_closed(sock) == (b"", "timeout")
        proxy.heal()
        sock.sendall(b"found")
        assert sock.recv(10) == b"found"
    assert proxy.stats.dropped == 4


def test_a_stall_holds_bytes_for_its_time_and_loses_none(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.stall(1.0)
        started = time.monotonic()
        sock.sendall(b"z" * 300_000)  # more than the kernel buffers hold: it blocks
        got = b""
        while len(got) < 300_000:
            got += sock.recv(65536)
        took = time.monotonic() - started
    assert got == b"z" * 300_000 and 0.9 <= took < 5


def test_a_stall_without_a_time_lasts_until_heal(proxy: FaultProxy) -> None:
    with connect(proxy, timeout=1.0) as sock:
        proxy.stall(direction=DOWN)
        sock.sendall(b"wait")
        assert read_until_closed(sock) == (b"", "timeout")
        proxy.heal()
        sock.settimeout(5)
        assert sock.recv(10) == b"wait"


def test_delay_holds_each_chunk(proxy: FaultProxy) -> None:
    proxy.delay(0.2)
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"slow")
        assert sock.recv(10) == b"slow"
        assert time.monotonic() - started >= 0.4  # once up, once down
        proxy.delay(0)
        started = time.monotonic()
        sock.sendall(b"fast")
        assert sock.recv(10) == b"fast"
        assert time.monotonic() - started < 0.2


def test_refuse_resets_new_connections_and_leaves_open_ones(proxy: FaultProxy) -> None:
    with established(proxy) as old:
        proxy.refuse()
        # Reset on connect, or on the first read:
        with pytest.raises(ConnectionResetError), connect(proxy) as new:
            new.sendall(b"x")
            new.recv(10)
        old.sendall(b"still")
        assert old.recv(10) == b"still"
    proxy.up()
    with connect(proxy) as sock:
        sock.sendall(b"back")
        assert sock.recv(10) == b"back"
    assert proxy.stats.refused == 1


def test_down_stops_listening_and_cuts_then_up_listens_on_the_same_port(
    proxy: FaultProxy,
) -> None:
    port = proxy.port
    with established(proxy) as old:
        assert proxy.down() == 1
        assert read_until_closed(old)[1] == "reset"
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.up()
    assert proxy.port == port
    with connect(proxy) as sock:
        sock.sendall(b"up")
        assert sock.recv(10) == b"up"


def test_after_bytes_runs_the_action_at_the_boundary(proxy: FaultProxy) -> None:
    seen: list[int] = []
    fired = proxy.after(bytes=6, direction=UP, action=lambda: seen.append(proxy.stats.bytes_up))
    with connect(proxy) as sock:
        sock.sendall(b"0123456789")
        assert sock.recv(100)
    assert fired.wait(5) and seen == [6]


def test_an_action_may_inject_a_fault_at_the_boundary(proxy: FaultProxy) -> None:
    proxy.after(bytes=4, direction=UP, action=lambda: proxy.blackhole(UP))
    with connect(proxy, timeout=0.5) as sock:
        sock.sendall(b"abcdefgh")
        assert read_until_closed(sock) == (b"abcd", "timeout")


def test_the_server_closing_is_passed_on_as_a_clean_close(echo: EchoServer) -> None:
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as sock:
        sock.sendall(b"bye")
        assert sock.recv(10) == b"bye"
        sock.shutdown(socket.SHUT_WR)  # the echo server closes when its input ends
        assert read_until_closed(sock) == (b"", "eof")
        wait_for(lambda: proxy.stats.active == 0)


def test_a_server_that_is_really_down_makes_the_proxy_reset() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with FaultProxy("127.0.0.1", port) as proxy, connect(proxy) as sock:
        assert read_until_closed(sock)[1] == "reset"


def test_close_cuts_everything_and_leaves_no_thread_or_socket(echo: EchoServer) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def proxy_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("faultproxy")]

    assert proxy_threads() == []
    before = fds()
    proxy = FaultProxy("127.0.0.1", echo.port)
    socks = [established(proxy) for _ in range(20)]
    proxy.stall(30)
    proxy.close()
    proxy.close()  # idempotent
    assert {read_until_closed(sock)[1] for sock in socks} == {"reset"}
    for sock in socks:
        sock.close()
    assert proxy_threads() == []
    wait_for(lambda: fds() == before)  # the echo server closes its ends as the resets arrive
    with pytest.raises(RuntimeError, match="closed"):
        proxy.cut()


def test_url_points_a_client_url_at_the_proxy(proxy: FaultProxy) -> None:
    port = proxy.port
    assert proxy.url("amqp://guest:p%40ss@127.0.0.1:5672/vh") == (
        f"amqp://guest:p%40ss@127.0.0.1:{port}/vh"
    )
    assert proxy.url("postgresql+psycopg://postgres@db.example:5432/test?x=1") == (
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?x=1"
    )
    assert proxy.endpoint == f"http://127.0.0.1:{port}"


def test_odd_arguments_are_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="nbytes"):
        proxy.cut_after(-1)
    with pytest.raises(ValueError, match="exactly one"):
        proxy.after(bytes=1, requests=1)
    with pytest.raises(ValueError, match="http=True"):
        proxy.after(requests=1)
    with pytest.raises(ValueError, match="direction"):
        proxy.blackhole("sideways")  # type: ignore[arg-type]
