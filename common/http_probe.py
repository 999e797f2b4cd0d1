"""A tiny HTTP server for a service without an HTTP face: ``/metrics`` (Prometheus text
format), ``/health`` (liveness) and ``/ready`` (readiness).

It answers from a daemon thread of its own, not from the service's event loop: a worker runs
CPU steps on its event loop's thread (see worker/service.py), and a probe must not wait for a
step to end to say that the process is alive. Readiness is the caller's function.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]   # (ready, why not / a detail)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:   # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics(), CONTENT_TYPE_LATEST)
        elif path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/ready":
            ready, reason = self.server.ready()
            if ready:
                self._json(200, {"status": "ready", **({"detail": reason} if reason else {})})
            else:
                self._json(503, {"status": "not ready", "reason": reason})
        else:
            self._json(404, {"error": f"no such path {path}"})

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:   # noqa: A002
        pass   # scrapes and probes every few seconds: no access log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: Callable[[], bytes],
                 ready: Readiness) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.ready = ready


class ProbeServer:
    """``/metrics``, ``/health``, ``/ready`` on ``host:port`` (port 0 in ``start``: any free one)."""

    def __init__(self, host: str, port: int, metrics: Callable[[], bytes],
                 ready: Readiness) -> None:
        self.host, self.port = host, port
        self._server = _Server((host, port), metrics, ready)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-probe",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    def start(self) -> ProbeServer:
        self._thread.start()
        logger.info("metrics and probes on http://%s:%d (/metrics /health /ready)",
                    self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_probe(host: str, port: int, metrics: Callable[[], bytes],
                ready: Readiness) -> ProbeServer | None:
    """A started ProbeServer, or None when ``port`` is 0 (the contract's "disabled")."""
    if port == 0:
        return None
    return ProbeServer(host, port, metrics, ready).start()
