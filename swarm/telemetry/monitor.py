"""The monitor: collect the swarm's records every ``monitor.period``, keep them, and serve them.

:class:`Monitor` composes a :class:`~swarm.telemetry.collector.Collector` (DHT -> view), a
:class:`~swarm.telemetry.history.History` (view -> SQLite) and a :class:`~swarm.telemetry.web.DashboardServer`
(dashboard, API, /metrics, CSV). Its own DHT node is a client: it reads, it writes nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from hivemind.utils import get_logger

from swarm.config.schema import MonitorConfig
from swarm.errors import SwarmError
from swarm.loops import PeriodicLoop
from swarm.net.dht import DHT_CALL_FAILURES
from swarm.telemetry.collector import Collector, SwarmView
from swarm.telemetry.history import History
from swarm.telemetry.prometheus import SwarmCollector, exposition, make_registry
from swarm.telemetry.web import DashboardServer

logger = get_logger(__name__)

PRUNE_PERIOD = 3600.0  # seconds between removals of history older than monitor.history_days
LEFT_SHOWN = 50  # peers that left, most recent first, in /api/swarm


class Monitor:
    """serve() -> the dashboard answers at :attr:`url` (history only); start(collector) -> it collects;
    wait_ready() -> the first collection is in; shutdown().

    Serving starts before the DHT is joined, so a taken port fails fast and the history stays
    readable while the swarm is unreachable. A collection that fails (the DHT did not answer in
    time) is logged, counted and retried at the next period; the last good view stays served.
    """

    def __init__(self, *, history: History, config: MonitorConfig, run_id: str):
        self.history, self.config, self.run_id = history, config, run_id
        self.collector: Optional[Collector] = None
        self.server = DashboardServer(self, host=config.host, port=config.port)
        self.registry = make_registry(SwarmCollector(self._latest_with_stats, history.peers))
        self.started_at = time.time()
        self._view: Optional[SwarmView] = None
        self._stats = {"collections": 0, "errors": 0}
        self._lock = threading.Lock()
        # a collection whose DHT call failed is counted and retried inside _collect; anything else ends the loop
        self._loop = PeriodicLoop(name="monitor", iteration=self._collect, period=config.period, from_start=True)
        self._last_prune = 0.0

    @property
    def url(self) -> str:
        return self.server.url

    def serve(self) -> "Monitor":
        """:raises MonitorError: the dashboard's address cannot be bound."""
        self.server.start()
        return self

    def start(self, collector: Collector) -> "Monitor":
        self.collector = collector
        self._loop.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """True once the first collection is in (or timed out). :raises BackgroundError: the thread died."""
        return self._loop.wait_ready(timeout)

    def check(self) -> None:
        """:raises SwarmError: the collecting thread (:class:`~swarm.errors.BackgroundError`) or the HTTP
        server died."""
        self._loop.check()
        if not self.server.is_alive():
            raise SwarmError("the monitor's web server stopped")

    def shutdown(self, timeout: float = 10.0) -> None:
        self._loop.shutdown(timeout)
        self.server.shutdown()
        self.history.close()

    def collect_once(self) -> SwarmView:
        view = self.collector.collect()
        self.history.record(view)
        with self._lock:
            self._view = view
            self._stats["collections"] += 1
        return view

    def _collect(self) -> None:
        try:
            view = self.collect_once()
            logger.debug(f"collected {len(view.peers)} peers, {len(view.flagged)} flagged")
        except DHT_CALL_FAILURES as e:  # counted here (the dashboard shows it), not left to the loop
            with self._lock:
                self._stats["errors"] += 1
            logger.warning(f"the DHT did not answer ({e!r}); collecting again next period")
        self._maybe_prune()

    def _maybe_prune(self) -> None:
        if self.config.history_days is None or time.monotonic() - self._last_prune < PRUNE_PERIOD:
            return
        self._last_prune = time.monotonic()
        self.history.prune(time.time() - self.config.history_days * 86400)

    def _latest_with_stats(self) -> tuple[Optional[SwarmView], dict]:
        with self._lock:
            return self._view, dict(self._stats)

    # what the web server asks for (swarm.telemetry.web.MonitorApi)

    def swarm_json(self) -> dict:
        view, stats = self._latest_with_stats()
        left = [row for row in self.history.peers() if row["state"] == "left"]
        left.sort(key=lambda row: row["last_seen"], reverse=True)
        return {
            "run_id": self.run_id,
            "period": self.config.period,
            "monitor_started": self.started_at,
            "history_since": self.history.first_time(),
            "collections": stats["collections"],
            "collection_errors": stats["errors"],
            "view": view.as_dict() if view is not None else None,
            "left": left[:LEFT_SHOWN],
        }

    def history_json(self, *, since: float, points: int) -> dict:
        return {"run_id": self.run_id, "swarm": self.history.swarm_series(since=since, max_points=points)}

    def peer_history_json(self, *, since: float, points: int) -> dict:
        return {"run_id": self.run_id, "peers": self.history.peer_series(since=since, max_points=points)}

    def peers_json(self) -> dict:
        return {"run_id": self.run_id, "peers": self.history.peers()}

    def metrics_text(self) -> bytes:
        return exposition(self.registry)

    def csv_chunks(self, table: str):
        return self.history.csv_rows(table)

    def healthy(self) -> bool:
        return self._loop.error is None and self._loop.ready.is_set() and self._loop.is_alive()
