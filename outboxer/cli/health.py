"""``--health-port`` and ``--metrics-port`` of the long-running commands.

Health, over plain HTTP (for Kubernetes probes, systemd, load balancers):

* ``GET /live``: 200 while the loop turns (its last :mod:`~outboxer.heartbeat` beat is
  younger than ``--liveness-timeout``), 503 when it is stuck. Waiting for a database or
  broker that is down counts as turning: restarting the process would not help, so a
  liveness probe must not fail then. A consumer is stuck too when every worker has been
  in one handler run for longer than ``--liveness-timeout`` (:mod:`outboxer.watchdog`):
  a handler that never returns holds its thread for ever, and only a restart frees it.
* ``GET /ready``: 200 when the database (with outboxer's tables) and the broker answer,
  503 with the one-line problem otherwise (the start-up checks of :mod:`.readiness`,
  run at most every few seconds however often the probe asks).

Both answer a small JSON object. Metrics: the OpenTelemetry metrics (the same as those
exported over OTLP) in Prometheus' text format, served by OpenTelemetry's Prometheus
exporter and ``prometheus_client`` at ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import ConfigurationError, OperatorError
from ..heartbeat import Stalled
from ..tracing import configure_from_env
from .common import Seconds, setting
from .readiness import Check

__all__ = ["Address", "HealthServer", "observability", "serve_metrics", "service_options"]

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("outboxer.cli")

READY_CACHE_SECONDS = 5.0
READY_TIMEOUT = 4.5
"""Seconds ``/ready`` waits for its checks: a database or broker that accepted the
connection but has not answered by then (a hung server, a pooler queueing its clients)
is not ready. The check goes on in its own thread; its answer serves the next probes."""
READY_RETRY = 60.0
"""A check that has not answered for this long is left behind, and the next probe starts
another one (a connection whose answer will never come must not make /ready fail forever)."""


if TYPE_CHECKING:  # click < 8.2 has no generic ParamType at run time
    _AddressType = click.ParamType[tuple[str, int]]
else:
    _AddressType = click.ParamType


class Address(_AddressType):
    """``PORT`` (every interface) or ``HOST:PORT``."""

    name = "[HOST:]PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        host, _, port = str(value).strip().rpartition(":")
        try:
            number = int(port)
        except ValueError:
            self.fail(f"{value!r} is not a port or HOST:PORT (8080, 127.0.0.1:8080)", param, ctx)
        if not 0 <= number <= 65535:
            self.fail(f"{value!r}: a port is 0 to 65535", param, ctx)
        return host.strip("[]") or "0.0.0.0", number


class HealthServer:
    """Serves ``/live`` and ``/ready`` on ``address`` from a daemon thread."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        liveness: Callable[[], float | None],
        liveness_timeout: float,
        checks: list[Check],
        stalled: Stalled | None = None,
    ) -> None:
        self.liveness = liveness
        self.liveness_timeout = liveness_timeout
        self.stalled = stalled
        """A consumer's workers: every one of them in a handler run, for how long."""
        self.checks = checks
        self._ready: tuple[float, str | None] | None = None
        self._checking: tuple[float, threading.Event] | None = None
        """The check in progress: when it started, and its end."""
        self._lock = threading.Lock()
        try:
            self._server = _server_class(address[0])(address, _handler(self))
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve health checks on {address[0]}:{address[1]}: {exc.strerror}"
            ) from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outboxer-health", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health checks on http://%s/live and /ready", _netloc(*self._address()))
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def live(self) -> tuple[int, dict[str, Any]]:
        age = self.liveness()
        if age is not None and age <= self.liveness_timeout:
            held = self.stalled() if self.stalled is not None else None
            if held is None or held[0] <= self.liveness_timeout:
                return 200, {"status": "alive", "last_turn_seconds_ago": round(age, 3)}
            seconds, workers, what = held
            return 503, {
                "status": "stuck",
                "problem": f"every worker ({workers}) has been in one handler run for over "
                f"{self.liveness_timeout:g} s: {what}",
                "last_turn_seconds_ago": round(age, 3),
                "busy_seconds": round(seconds, 3),
                "liveness_timeout": self.liveness_timeout,
            }
        return 503, {
            "status": "stuck",
            "last_turn_seconds_ago": None if age is None else round(age, 3),
            "liveness_timeout": self.liveness_timeout,
        }

    def ready(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            now = time.monotonic()
            stale = self._ready is None or now - self._ready[0] > READY_CACHE_SECONDS
            if stale and (self._checking is None or now - self._checking[0] > READY_RETRY):
                self._checking = (now, threading.Event())
                threading.Thread(
                    target=self._refresh, args=(self._checking,), name="outboxer-ready", daemon=True
                ).start()
            checking = self._checking
        if checking is not None:  # waited for outside the lock: a slow check holds up no probe
            checking[1].wait(max(0.0, checking[0] + READY_TIMEOUT - time.monotonic()))
        with self._lock:
            if checking is not None and not checking[1].is_set():
                problem: str | None = (
                    "the database or the broker did not answer the readiness checks within "
                    f"{READY_TIMEOUT:g} s: is it hung or overloaded?"
                )
            else:
                problem = None if self._ready is None else self._ready[1]
        if problem is None:
            return 200, {"status": "ready"}
        return 503, {"status": "not ready", "problem": problem}

    def _refresh(self, checking: tuple[float, threading.Event]) -> None:
        problem = self._problem()
        with self._lock:
            self._ready = (time.monotonic(), problem)
            if self._checking is checking:
                self._checking = None
        checking[1].set()

    def _problem(self) -> str | None:
        try:
            for check in self.checks:
                check()
        except OperatorError as exc:
            return str(exc)
        except Exception as exc:  # a probe answers, whatever happens
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None

    def _address(self) -> tuple[str, int]:
        host = str(self._server.server_address[0])
        return host, self.port


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    """ThreadingHTTPServer, on IPv6 for an IPv6 host (``[::1]:8080``, ``[::]:8080``)."""
    if ":" not in host:
        return ThreadingHTTPServer

    class IPv6Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    return IPv6Server


def _netloc(host: str, port: int) -> str:
    """``host:port`` for a URL, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            routes = {"/live": server.live, "/ready": server.ready}
            route = routes.get(self.path.split("?")[0].rstrip("/") or "/")
            status, body = route() if route else (404, {"paths": ["/live", "/ready"]})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    return Handler


def serve_metrics(address: tuple[str, int]) -> tuple[Any, Callable[[], None]]:
    """Start the Prometheus endpoint; returns the metric reader to give the SDK, and a
    function that stops the endpoint."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise ConfigurationError(
            "--metrics-port needs OpenTelemetry's Prometheus exporter: pip install 'outboxer[otel]'"
        ) from exc
    reader = PrometheusMetricReader()
    try:
        started: Any = start_http_server(address[1], addr=address[0])
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {address[0]}:{address[1]}: {exc.strerror}"
        ) from exc
    bound = address[1]
    if isinstance(started, tuple):  # prometheus_client >= 0.17: (server, thread)
        bound = int(started[0].server_address[1])  # the port chosen for port 0
    log.info("Prometheus metrics on http://%s/metrics", _netloc(address[0], bound))
    if isinstance(started, tuple):

        def stop() -> None:
            started[0].shutdown()
            started[0].server_close()

        return reader, stop
    return reader, lambda: None


def service_options(fn: F) -> F:
    """``--health-port``, ``--metrics-port`` and ``--liveness-timeout``."""
    options = [
        setting(
            "--health-port",
            type=Address(),
            default=None,
            help="Serve /live (the loop turns) and /ready (database and broker answer) over "
            "HTTP on this port (or HOST:PORT; every interface by default).",
        ),
        setting(
            "--metrics-port",
            type=Address(),
            default=None,
            help="Serve the OpenTelemetry metrics in Prometheus' format at /metrics on this "
            "port (or HOST:PORT).",
        ),
        setting(
            "--liveness-timeout",
            type=Seconds(5),
            default=60.0,
            metavar="SECONDS",
            help="/live fails when the loop has not turned for this long (outboxer-inbox: "
            "or when every worker has been in one handler run for this long).",
        ),
    ]
    for add in reversed(options):
        fn = add(fn)
    return fn


@contextlib.contextmanager
def observability(
    service: str,
    *,
    health_port: tuple[str, int] | None,
    metrics_port: tuple[str, int] | None,
    liveness: Callable[[], float | None],
    liveness_timeout: float,
    checks: list[Check],
    stalled: Stalled | None = None,
) -> Iterator[None]:
    """Telemetry from ``OTEL_*`` (plus the Prometheus endpoint), and the health endpoint,
    for the life of a long-running command."""
    stops: list[Callable[[], None]] = []
    try:
        readers: list[Any] = []
        if metrics_port is not None:
            reader, stop_metrics = serve_metrics(metrics_port)
            readers.append(reader)
            stops.append(stop_metrics)
        stops.append(configure_from_env(service, metric_readers=readers))
        if health_port is not None:
            server = HealthServer(
                health_port,
                liveness=liveness,
                liveness_timeout=liveness_timeout,
                checks=checks,
                stalled=stalled,
            ).start()
            stops.append(server.close)
        yield
    finally:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                stop()
