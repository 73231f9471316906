"""What the controller counts for other tools: Prometheus metrics on an HTTP port.

The controller calls an ``Observer`` at the moments worth counting (a round ends, a
combiner reports a refused update, a payload moves, nodes come and go). The plain
``Observer`` does nothing; ``PrometheusObserver`` (``scaleout serve --metrics-port``)
keeps counters in a registry of its own, one per controller, so several controllers in one
process never share a series, and serves them from prometheus_client's HTTP server on a
thread of its own. Each call is an increment or a set (a lock and an add): nothing is
formatted, hashed or written on the event loop; a scrape is answered on the server's thread.
prometheus_client is imported only here, and only when the port is asked for.
"""

from __future__ import annotations

import logging
from typing import Any

from scaleout.core.refusals import REASONS, refusal_reason

log = logging.getLogger("scaleout.metrics")

PREFIX = "scaleout"
ROUND_STATUSES = ("succeeded", "failed")
SESSION_STATUSES = ("finished", "failed", "stopped")
DIRECTIONS = ("in", "out")
PAYLOAD_KINDS = ("model", "package", "partial")
# Rounds take from a fraction of a second (small models on a LAN) to hours (timeouts).
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class Observer:
    """Told what happens on the controller; this one forgets it (no --metrics-port)."""

    url: str | None = None

    def round_finished(self, status: str, duration_s: float) -> None:
        pass

    def session_started(self) -> None:
        pass

    def session_finished(self, status: str) -> None:
        pass

    def nodes(self, combiners: int, clients: int) -> None:
        pass

    def moved(self, direction: str, kind: str, size: int) -> None:
        pass

    def update_reported(self, error: str | None) -> None:
        pass

    def combiner_message(self, kind: str) -> None:
        pass

    def close(self) -> None:
        pass


class PrometheusObserver(Observer):
    """Counts into its own registry and serves it at ``http://HOST:PORT/metrics``."""

    def __init__(self, host: str, port: int, version: str = "", protocol: int = 0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
        from prometheus_client.process_collector import ProcessCollector

        self.registry = reg = CollectorRegistry(auto_describe=True)
        ProcessCollector(namespace=PREFIX, registry=reg)  # scaleout_process_cpu_seconds_total, ..._resident_memory_bytes
        Info("build", "Version and wire protocol of this controller", namespace=PREFIX, registry=reg).info(
            {"version": version, "protocol": str(protocol)}
        )
        self.rounds = Counter("rounds", "Rounds that ended, by status", ["status"], namespace=PREFIX, registry=reg)
        self.round_duration = Histogram(
            "round_duration_seconds", "How long each round took, from its start to its outcome", namespace=PREFIX, registry=reg,
            buckets=ROUND_BUCKETS,
        )
        self.sessions = Counter("sessions", "Sessions that ended, by status", ["status"], namespace=PREFIX, registry=reg)
        self.sessions_running = Gauge("sessions_running", "1 while a session runs, else 0", namespace=PREFIX, registry=reg)
        self.combiners = Gauge("combiners_connected", "Combiners connected to the controller", namespace=PREFIX, registry=reg)
        self.clients = Gauge("clients_connected", "Clients connected to the combiners", namespace=PREFIX, registry=reg)
        self.bytes = Counter(
            "payload_bytes", "Payload bytes (models, packages, partial aggregates) the controller received (in) or sent (out)",
            ["direction", "kind"], namespace=PREFIX, registry=reg,
        )
        self.accepted = Counter("updates_accepted", "Client updates folded into a round", namespace=PREFIX, registry=reg)
        self.refused = Counter(
            "updates_refused", "Client updates refused or missing from a round, by reason (see the README)", ["reason"],
            namespace=PREFIX, registry=reg,
        )
        self.messages = Counter(
            "combiner_messages", "Messages combiners sent the controller (not requests), by type: a round brings a few per combiner",
            ["type"], namespace=PREFIX, registry=reg,
        )
        # Every label value known in advance shows from the first scrape, at 0: rate() and
        # alerts work without waiting for the first event of each kind.
        for status in ROUND_STATUSES:
            self.rounds.labels(status)
        for status in SESSION_STATUSES:
            self.sessions.labels(status)
        for direction in DIRECTIONS:
            for kind in PAYLOAD_KINDS:
                self.bytes.labels(direction, kind)
        for reason in REASONS:
            self.refused.labels(reason)
        self._server, self._thread = _serve(host, port, reg)
        bound = self._server.server_address
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/metrics"

    def round_finished(self, status: str, duration_s: float) -> None:
        self.rounds.labels(status).inc()
        self.round_duration.observe(duration_s)

    def session_started(self) -> None:
        self.sessions_running.set(1)

    def session_finished(self, status: str) -> None:
        self.sessions.labels(status).inc()
        self.sessions_running.set(0)

    def nodes(self, combiners: int, clients: int) -> None:
        self.combiners.set(combiners)
        self.clients.set(clients)

    def moved(self, direction: str, kind: str, size: int) -> None:
        if size > 0:
            self.bytes.labels(direction, kind).inc(size)

    def update_reported(self, error: str | None) -> None:
        if error is None:
            self.accepted.inc()
        else:
            self.refused.labels(refusal_reason(error)).inc()

    def combiner_message(self, kind: str) -> None:
        self.messages.labels(kind).inc()

    def close(self) -> None:
        """Stop serving (blocks up to the server's poll interval: call it off the event loop)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


MAX_CONNECTIONS = 32  # scrapes served at once; more are closed as they arrive
IDLE_S = 10.0  # a connection that sends nothing for this long (a half request) is closed
REFUSAL_LOG_S = 60.0  # refused connections are logged once per this long, counted


def _serve(host: str, port: int, registry: Any) -> tuple[Any, Any]:
    """prometheus_client's metrics handler on ``host:port`` (0: a free one), behind a server
    that serves at most MAX_CONNECTIONS at once and closes a connection idle for IDLE_S, so
    idle or half-sent requests cannot take the controller's file descriptors; what it refuses
    or fails on is one log line per burst, not a traceback each. A port in use or an address
    this machine does not have is a ConfigError, as for the controller's own port."""
    import errno
    import http.server
    import socket
    import socketserver
    import threading
    import time

    from prometheus_client.exposition import MetricsHandler

    from scaleout.core.errors import ConfigError

    class Handler(MetricsHandler):  # type: ignore[misc, valid-type]
        timeout = IDLE_S  # per read and write on the connection

    Handler.registry = registry

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        block_on_close = False
        allow_reuse_address = True
        request_queue_size = 64
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def __init__(self) -> None:
            self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
            self.lock = threading.Lock()
            self.burst = {"refused": 0, "failed": 0, "logged": 0.0}
            super().__init__((host, port), Handler)

        def _note(self, what: str, detail: str) -> None:
            with self.lock:
                self.burst[what] += 1
                now = time.monotonic()
                if now - self.burst["logged"] < REFUSAL_LOG_S:
                    return
                counts = f"{self.burst['refused']} refused (more than {MAX_CONNECTIONS} at once), {self.burst['failed']} failed"
                self.burst.update(refused=0, failed=0, logged=now)
            log.warning("metrics port: %s in the last %g s; last: %s", counts, REFUSAL_LOG_S, detail)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self._note("refused", f"{client_address[0]}")
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            import sys

            exc = sys.exc_info()[1]
            self._note("failed", f"{client_address[0]}: {type(exc).__name__}: {exc}")

    try:
        server = Server()
    except OSError as exc:
        where = f"cannot serve metrics on {host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = f"port {port} is already in use; choose another with --metrics-port (0 picks a free one)"
        elif exc.errno == errno.EACCES:
            why = "permission denied (ports below 1024 need privileges); choose another with --metrics-port"
        else:
            why = f"{exc.strerror or exc}; check --metrics-host"
        raise ConfigError("", f"{where}: {why}") from None
    thread = threading.Thread(target=server.serve_forever, name="scaleout-metrics", daemon=True)
    thread.start()
    return server, thread


def start(host: str, port: int) -> PrometheusObserver:
    from scaleout import __version__
    from scaleout.core.messages import PROTOCOL_VERSION

    return PrometheusObserver(host, port, __version__, PROTOCOL_VERSION)
