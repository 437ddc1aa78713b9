"""Private RabbitMQ, PostgreSQL and MariaDB instances that a scenario may stop and restart.

The machine's shared services (RabbitMQ on 5672, PostgreSQL on 5432) serve everyone's
tests and are never touched here. A scenario that stops a broker or restarts a database
gets its own: a second RabbitMQ node (``chaos-<pid>@localhost``, its own ports, data and
logs in a temporary directory, no plugins) or a second PostgreSQL cluster (``initdb`` in a
temporary directory, run as the ``postgres`` user on its own port) or a second MariaDB
server (``mariadb-install-db`` in a temporary directory, its own port and socket). Each is
removed when the scenario ends, also when it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from tests.faultproxy import FaultProxy

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
_STARTING = "cannot start"
PRIVATE = os.environ.get("OUTBOXER_CHAOS_PRIVATE", "1") != "0"  # 0: the proxy's down mode


def proxy_to(url: str, default_port: int) -> FaultProxy:
    parts = urlsplit(url)
    return FaultProxy(parts.hostname or "127.0.0.1", parts.port or default_port)


class Unavailable(RuntimeError):
    """A private instance cannot be started on this machine."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _run(
    command: list[str],
    *,
    user: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> None:
    if user is not None and os.geteuid() == 0:
        command = [
            "runuser",
            "-u",
            user,
            "--",
            "env",
            *(f"{k}={v}" for k, v in (env or {}).items()),
            *command,
        ]
        env = None
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(command[-4:])} failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )


class PrivateRabbitMQ:
    """A second RabbitMQ node on this machine; ``url`` reaches it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.node = f"chaos{os.getpid()}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="outboxer-chaos-rabbitmq-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        self.env = {
            "HOME": "/var/lib/rabbitmq",  # the Erlang cookie the CLI tools share
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.directory / "pid"),
        }
        self._user = "rabbitmq" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(self.directory, self._user)

    def _ctl(self, *args: str, timeout: float = 120) -> None:
        _run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            user=self._user,
            env=self.env,
            timeout=timeout,
        )

    def start(self) -> None:
        _run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"], user=self._user, env=self.env)
        # -detached returns at once; await_startup fails until the node has registered.
        deadline = time.monotonic() + 120
        while True:
            try:
                self._ctl("await_startup", "--timeout", "60", timeout=90)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop_app(self) -> None:
        self._ctl("stop_app")

    def alarm(self, on: bool = True) -> None:
        """Raise (or clear) a disk alarm: the node blocks every publishing connection until
        it clears, as on a broker that runs out of disk or memory."""
        self._ctl("set_disk_free_limit", "1000000GB" if on else "50MB")

    def start_app(self) -> None:
        self._ctl("start_app")
        deadline = time.monotonic() + 60
        while not port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._ctl("shutdown", timeout=60)
        shutil.rmtree(self.directory, ignore_errors=True)


def private_rabbitmq() -> AbstractContextManager[PrivateRabbitMQ]:
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        raise Unavailable("RabbitMQ is not installed here (no /usr/lib/rabbitmq/bin)")
    return _running(PrivateRabbitMQ(), "a private RabbitMQ node")


class PrivatePostgreSQL:
    """A second PostgreSQL cluster (initdb in a temporary directory); ``server`` is the URL
    of its ``postgres`` database, for :func:`chaos.world.fresh_database`."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not versions:
            raise Unavailable("PostgreSQL's server programs are not installed here")
        self.bin = versions[-1].parent
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="outboxer-chaos-postgresql-"))
        self.data = self.directory / "data"
        self.server = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(self.directory, self._user)

    def _pg_ctl(self, *args: str) -> None:
        _run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args],
            user=self._user,
        )

    def start(self) -> None:
        _run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
            user=self._user,
        )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.directory} -c fsync=off"
        )
        self._pg_ctl("-o", options, "-l", str(self.directory / "log"), "start")

    def restart(self) -> None:
        """A fast restart: every connection is dropped, the server is back when it returns."""
        # -l again: without it the server would write to our pipe and hold it open.
        self._pg_ctl("-m", "fast", "-l", str(self.directory / "log"), "restart")

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


def private_postgresql() -> AbstractContextManager[PrivatePostgreSQL]:
    return _running(PrivatePostgreSQL(), "a private PostgreSQL cluster")


MARIADB_SERVER = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
MARIADB_INSTALL = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"


class PrivateMariaDB:
    """A second MariaDB server (``mariadb-install-db`` in a temporary directory, its own
    port and socket, no grant checks); ``server`` is the URL of its ``test`` database.

    :meth:`restart` is a clean shutdown (every connection is killed, statements in
    progress fail) and a start on the same data; :meth:`kill` is a crash (SIGKILL), the
    next :meth:`start_again` recovers from InnoDB's log.
    """

    def __init__(self) -> None:
        if not (Path(MARIADB_SERVER).exists() and Path(MARIADB_INSTALL).exists()):
            raise Unavailable("MariaDB's server programs are not installed here")
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="outboxer-mariadb-"))
        self.data = self.directory / "data"
        self.socket = self.directory / "sock"
        self.server = f"mysql+pymysql://root@127.0.0.1:{self.port}/test"
        self._user = "mysql" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(self.directory, self._user)
        self._process: subprocess.Popen[bytes] | None = None
        self.databases: list[str] = []
        """Databases made on it (to name the next one)."""

    def start(self) -> None:
        _run(
            [
                MARIADB_INSTALL,
                "--no-defaults",
                f"--datadir={self.data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *([f"--user={self._user}"] if self._user else []),
            ],
        )
        self.start_again()
        # The grant tables are skipped: no user to create, every client is root.
        with contextlib.closing(self._connect()) as conn, conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS test")

    def _connect(self) -> Any:
        import pymysql  # a test dependency; chaos imports this module without it

        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", autocommit=True)

    def execute(self, statement: str) -> None:
        """Run one statement as root (``SET GLOBAL read_only=1``, ``KILL ...``)."""
        with contextlib.closing(self._connect()) as conn, conn.cursor() as cursor:
            cursor.execute(statement)

    def start_again(self, timeout: float = 60) -> None:
        """Start the server on its data directory; returns once it takes connections."""
        log = open(self.directory / "log", "ab")  # noqa: SIM115 - the server's, closed below
        try:
            self._process = subprocess.Popen(
                [
                    MARIADB_SERVER,
                    "--no-defaults",
                    f"--datadir={self.data}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    f"--socket={self.socket}",
                    f"--pid-file={self.directory / 'pid'}",
                    "--skip-grant-tables",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-log-file-size=16M",
                    "--innodb-flush-log-at-trx-commit=2",
                    "--skip-log-bin",
                    *([f"--user={self._user}"] if self._user else []),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mariadbd exited ({self._process.returncode}): "
                    f"{(self.directory / 'log').read_text(errors='replace')[-2000:]}"
                )
            try:
                self.execute("SELECT 1")
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd takes no connection after {timeout} s") from exc
                time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        """A clean shutdown (SIGTERM): connections are killed, the data is kept."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """A crash: SIGKILL; the next start recovers."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start_again()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def private_mariadb() -> AbstractContextManager[PrivateMariaDB]:
    return _running(PrivateMariaDB(), "a private MariaDB server")


class _Instance(Protocol):
    def start(self) -> None: ...
    def shutdown(self) -> None: ...


InstanceT = TypeVar("InstanceT", bound=_Instance)


@contextmanager
def _running(instance: InstanceT, what: str) -> Iterator[InstanceT]:
    """Start ``instance`` (Unavailable if it cannot start), shut it down afterwards."""
    try:
        try:
            instance.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"{_STARTING} {what}: {exc}") from exc
        yield instance
    finally:
        instance.shutdown()


@dataclass
class Stoppable:
    """A service a scenario may take down: ``relay_url`` for the relay, ``direct_url`` for
    everything else (the producer, the collector); ``stop()``/``start()``, or ``restart()``.

    A private instance when one can start here; otherwise the fault proxy in front of the
    shared service, whose ``down()`` refuses and cuts the relay's connections only (the
    service itself keeps running, so the fault is weaker: said in ``kind``).
    """

    kind: str
    relay_url: str
    direct_url: str
    stop: Callable[[], object]
    start: Callable[[], object]

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def stoppable_rabbitmq(shared_url: str) -> Iterator[Stoppable]:
    """A private RabbitMQ node (``stop_app``/``start_app``), or the proxy's down mode."""
    try:
        if not PRIVATE:
            raise Unavailable("OUTBOXER_CHAOS_PRIVATE=0")
        with private_rabbitmq() as node:
            yield Stoppable("private node", node.url, node.url, node.stop_app, node.start_app)
            return
    except Unavailable as exc:  # raised before the yield: no scenario ran yet
        reason = exc
    with proxy_to(shared_url, 5672) as proxy:
        yield Stoppable(
            f"proxy down mode ({reason})", proxy.url(shared_url), shared_url, proxy.down, proxy.up
        )


@contextmanager
def stoppable_postgresql(shared_server: str) -> Iterator[Stoppable]:
    """A private PostgreSQL cluster; its ``server`` URL is ``direct_url`` (and
    ``relay_url``): make databases on it. Or the proxy's down mode, 2 s, on the shared one."""
    try:
        if not PRIVATE:
            raise Unavailable("OUTBOXER_CHAOS_PRIVATE=0")
        with private_postgresql() as cluster:
            yield Stoppable(
                "private cluster", cluster.server, cluster.server, cluster.restart, lambda: None
            )
            return
    except Unavailable as exc:  # raised before the yield: no scenario ran yet
        reason = exc
    with proxy_to(shared_server, 5432) as proxy:

        def down() -> None:
            proxy.down()
            time.sleep(2)

        yield Stoppable(
            f"proxy down mode ({reason})", proxy.url(shared_server), shared_server, down, proxy.up
        )
