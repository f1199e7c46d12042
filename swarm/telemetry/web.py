"""The monitor's read-only HTTP server: dashboard, JSON API, Prometheus ``/metrics`` and CSV export.

==========================  ===============================================================
``GET /``                   the dashboard (``swarm/telemetry/dashboard/``; its chart library is served from here too)
``GET /api/swarm``          the latest collection: peers, totals, flagged and refused records
``GET /api/history``        swarm series; ``?since=<unix seconds>`` and ``?points=<1..5000>``
``GET /api/history/peers``  each peer's series (same buckets and parameters), the most recently seen first
``GET /api/peers``          every peer ever seen, with its contribution
``GET /metrics``            Prometheus text format (prometheus_client)
``GET /export/<t>.csv``     the history as CSV; ``t`` is ``swarm``, ``peer_samples`` or ``peers``
``GET /healthz``            200 while the monitor collects
==========================  ===============================================================

Only GET and HEAD are served; a bad query parameter gets a 400 with a JSON ``error``.
"""

from __future__ import annotations

import json
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from hivemind.utils import get_logger

from swarm.errors import MonitorError
from swarm.telemetry.prometheus import CONTENT_TYPE

logger = get_logger(__name__)

STATIC_DIR = Path(str(resources.files("swarm.telemetry") / "dashboard"))
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
MAX_POINTS = 5000


class BadRequest(ValueError):
    """A query parameter the API cannot use; answered with 400 and this message."""


class MonitorApi(Protocol):
    def swarm_json(self) -> dict: ...
    def history_json(self, *, since: float, points: int) -> dict: ...
    def peer_history_json(self, *, since: float, points: int) -> dict: ...
    def peers_json(self) -> dict: ...
    def metrics_text(self) -> bytes: ...
    def csv_chunks(self, table: str): ...
    def healthy(self) -> bool: ...


class DashboardServer:
    """Serves ``api`` on ``host:port`` from a background thread; port 0 picks a free one.

    :raises MonitorError: from :meth:`start` if the address cannot be bound (port taken, bad host).
    """

    def __init__(self, api: MonitorApi, *, host: str, port: int):
        self.api, self.host, self.port = api, host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "DashboardServer":
        try:
            server = ThreadingHTTPServer((self.host, self.port), _Handler)
        except OSError as e:
            raise MonitorError(f"cannot serve the dashboard on {self.host}:{self.port}: {e.strerror or e}; "
                               f"set monitor.port to a free port (0 picks one)") from None
        server.daemon_threads = True
        server.api = self.api
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.5),
                                        name="dashboard", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        shown = "127.0.0.1" if host == "0.0.0.0" else host
        return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout)


class _Handler(BaseHTTPRequestHandler):
    server_version = "swarm-monitor"
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def do_GET(self) -> None:
        self._route(send_body=True)

    def _refuse(self) -> None:
        self._send_json({"error": "the monitor is read-only: only GET and HEAD"}, HTTPStatus.METHOD_NOT_ALLOWED, True)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _route(self, *, send_body: bool) -> None:
        url = urlsplit(self.path)
        api = self.server.api
        try:
            query = parse_qs(url.query, strict_parsing=False)
            if url.path in ("/", "/index.html"):
                self._send_static("index.html", send_body)
            elif url.path.startswith("/static/"):
                self._send_static(url.path.removeprefix("/static/"), send_body)
            elif url.path == "/api/swarm":
                self._send_json(api.swarm_json(), HTTPStatus.OK, send_body)
            elif url.path in ("/api/history", "/api/history/peers"):
                since = _number(query, "since", 0.0, low=0.0)
                points = int(_number(query, "points", 1000, low=1, high=MAX_POINTS, integer=True))
                answer = api.history_json if url.path == "/api/history" else api.peer_history_json
                self._send_json(answer(since=since, points=points), HTTPStatus.OK, send_body)
            elif url.path == "/api/peers":
                self._send_json(api.peers_json(), HTTPStatus.OK, send_body)
            elif url.path == "/metrics":
                self._send(api.metrics_text(), CONTENT_TYPE, HTTPStatus.OK, send_body)
            elif url.path.startswith("/export/") and url.path.endswith(".csv"):
                self._send_csv(url.path.removeprefix("/export/").removesuffix(".csv"), send_body)
            elif url.path == "/healthz":
                healthy = api.healthy()
                self._send_json({"ok": healthy}, HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
                                send_body)
            else:
                self._send_json({"error": f"no such page: {url.path}"}, HTTPStatus.NOT_FOUND, send_body)
        except BadRequest as e:
            self._send_json({"error": str(e)}, HTTPStatus.BAD_REQUEST, send_body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away mid-answer

    def _send_static(self, name: str, send_body: bool) -> None:
        path = (STATIC_DIR / name).resolve()
        if STATIC_DIR.resolve() not in path.parents or not path.is_file() or path.suffix not in STATIC_TYPES:
            self._send_json({"error": f"no such file: {name}"}, HTTPStatus.NOT_FOUND, send_body)
            return
        self._send(path.read_bytes(), STATIC_TYPES[path.suffix], HTTPStatus.OK, send_body)

    def _send_csv(self, table: str, send_body: bool) -> None:
        try:
            chunks = self.server.api.csv_chunks(table)
        except KeyError:
            raise BadRequest(f"no table {table!r}; export swarm, peer_samples or peers") from None
        body = "".join(chunks).encode()
        self._send(body, "text/csv; charset=utf-8", HTTPStatus.OK, send_body,
                   extra={"Content-Disposition": f'attachment; filename="{table}.csv"'})

    def _send_json(self, data: dict, status: HTTPStatus, send_body: bool) -> None:
        body = json.dumps(data, allow_nan=False, default=str).encode()
        self._send(body, "application/json", status, send_body)

    def _send(self, body: bytes, content_type: str, status: HTTPStatus, send_body: bool,
              extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.debug(f"{self.address_string()} {format % args}")


def _number(query: dict, name: str, default: float, *, low: float | None = None, high: float | None = None,
            integer: bool = False) -> float:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1]) if integer else float(values[-1])
    except ValueError:
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}, got {values[-1]!r}") from None
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise BadRequest(f"{name} must be {bounds}, got {values[-1]!r}")
    return value
