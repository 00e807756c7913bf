"""The fleet's status page and Prometheus metrics, served over HTTP while a run goes on.

``/`` is the page (its assets are in the package: nothing from a CDN), ``/api/status`` the
status as JSON, ``/api/events`` the same as a server-sent event stream (a new status every
second), ``/metrics`` the Prometheus text exposition of the status (by ``prometheus_client``).
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Tuple

from .._errors import ConfigError
from ._model import STATES, FleetStatus

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._driver import FleetRun

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


def parse_address(address: str) -> Tuple[str, int]:
    """``HOST:PORT`` (port 0: any free port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"status address {address!r}: give HOST:PORT, e.g. 127.0.0.1:8765")
    return host.strip("[]") or "127.0.0.1", int(port)


class FleetCollector:
    """A Prometheus collector of a fleet's status, read at each scrape."""

    def __init__(self, status: Callable[[], FleetStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator["Metric"]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st: FleetStatus = self._status()
        labels = ["disk", "datastore"]
        size = GaugeMetricFamily(
            "blockferry_disk_size_bytes", "Virtual size of the disk.", labels=labels
        )
        done = GaugeMetricFamily(
            "blockferry_disk_done_bytes",
            "Virtual bytes worked through by the disk's current or last replication.",
            labels=labels,
        )
        sent = CounterMetricFamily(
            "blockferry_bytes_sent", "Bytes uploaded for the disk, every attempt.", labels=labels
        )
        rate = GaugeMetricFamily(
            "blockferry_disk_rate_bytes_per_second",
            "Virtual bytes per second of the disk's running replication.",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "blockferry_replication_lag_seconds",
            "Seconds since the view of the disk its newest snapshot holds was taken.",
            labels=labels,
        )
        attempts = CounterMetricFamily(
            "blockferry_disk_attempts", "Replications of the disk started.", labels=labels
        )
        snaps = CounterMetricFamily(
            "blockferry_snapshots", "Snapshots of the disk written by this run.", labels=labels
        )
        state = GaugeMetricFamily(
            "blockferry_disk_state",
            "1 for the disk's current state, 0 for the others.",
            labels=labels + ["state"],
        )
        for d in st.disks:
            lv = [d.name, d.datastore]
            size.add_metric(lv, d.bytes_total)
            done.add_metric(lv, d.bytes_done)
            sent.add_metric(lv, d.bytes_sent)
            rate.add_metric(lv, d.rate)
            if d.lag_seconds is not None:
                lag.add_metric(lv, d.lag_seconds)
            attempts.add_metric(lv, d.attempts)
            snaps.add_metric(lv, len(d.snapshots))
            for s in STATES:
                state.add_metric(lv + [s], 1.0 if d.state == s else 0.0)
        disks = GaugeMetricFamily(
            "blockferry_fleet_disks", "Disks of the fleet in each state.", labels=["state"]
        )
        for s, n in st.totals.states.items():
            disks.add_metric([s], n)
        throughput = GaugeMetricFamily(
            "blockferry_fleet_throughput_bytes_per_second",
            "Bytes the fleet sent per second, lately.",
            value=st.throughput[-1][1] if st.throughput else 0.0,
        )
        running = GaugeMetricFamily(
            "blockferry_fleet_running", "1 while the fleet runs.", value=1.0 if st.running else 0.0
        )
        yield from (size, done, sent, rate, lag, attempts, snaps, state, disks, throughput, running)


def metrics_text(status: Callable[[], FleetStatus]) -> Tuple[bytes, str]:
    """The Prometheus text exposition of a status source (a callable returning a
    :class:`FleetStatus`), and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(status))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True
    status: "StatusServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Httpd

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.status._get(self)


class StatusServer:
    """Serves a fleet run's page, status and metrics on ``address`` (``HOST:PORT``)."""

    def __init__(self, fleet: "FleetRun", address: str) -> None:
        host, port = parse_address(address)
        self._fleet = fleet
        self._stopping = threading.Event()
        try:
            self._httpd = _Httpd((host, port), _Handler)
        except OSError as e:
            raise ConfigError(f"cannot serve the status page on {address}: {e}") from e
        self._httpd.status = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fleet-status", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}/"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _send(self, h: BaseHTTPRequestHandler, body: bytes, ctype: str, code: int = 200) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-store")
        h.end_headers()
        h.wfile.write(body)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path in _ASSETS:
            name, ctype = _ASSETS[path]
            body = resources.files("blockferry.fleet").joinpath("static", name).read_bytes()
            self._send(h, body, ctype)
        elif path == "/api/status":
            self._send(h, _json(self._fleet.status().to_dict()), "application/json")
        elif path == "/metrics":
            body, ctype = metrics_text(self._fleet.status)
            self._send(h, body, ctype)
        elif path == "/api/events":
            self._stream(h)
        else:
            self._send(h, b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

    def _stream(self, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-store")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            while not self._stopping.is_set():
                st = self._fleet.status()
                h.wfile.write(b"data: " + _json(st.to_dict()) + b"\n\n")
                h.wfile.flush()
                if not st.running:
                    h.wfile.write(b"event: end\ndata: {}\n\n")
                    h.wfile.flush()
                    return
                self._stopping.wait(1.0)
        except (BrokenPipeError, ConnectionResetError):
            return


def _json(value: Dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()

