"""`swarm monitor`: watch a swarm from a DHT client peer; history, dashboard, JSON API, /metrics, CSV.

The history file is opened and the dashboard's port bound before the network is touched, so a
wrong path or a taken port ends in one line (exit 6) at once. ``--export-csv DIR`` only reads the
history file and writes CSV files; it does not join the swarm.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from peers.lifecycle import StopSignals, check_alive, set_log_peer, write_json_atomic
from swarm.config.schema import SwarmConfig
from swarm.errors import ConfigError, MonitorError, SwarmError
from swarm.net.admission import certified_run_id
from swarm.net.dht import shutdown_dht
from swarm.telemetry.collector import Collector, start_reader_dht
from swarm.telemetry.history import History
from swarm.telemetry.monitor import Monitor

logger = logging.getLogger(__name__)

LIVENESS_PERIOD = 2.0  # seconds between checks that the DHT, the collector and the web server live


def run_monitor(config: SwarmConfig, *, url_file: Optional[Path]) -> None:
    if not config.network.initial_peers:
        raise ConfigError("swarm monitor needs the address of a peer: --initial-peers /ip4/.../tcp/.../p2p/...")
    stop = StopSignals()
    config = config.model_copy(update={"run_id": certified_run_id(config.peer.certificate, config.run_id)})
    monitor = Monitor(history=History(config.monitor.db_path, config.run_id), config=config.monitor,
                      run_id=config.run_id)
    dht = None
    try:
        monitor.serve()
        dht = start_reader_dht(config.network, config.run_id, stop=stop.event, certificate=config.peer.certificate)
        set_log_peer("monitor", str(dht.peer_id))
        monitor.start(Collector(dht, config.run_id, max_samples_per_second=config.monitor.max_samples_per_second,
                                ban=config.averaging.robust.ban if config.averaging.robust else None))
        if url_file is not None:
            write_json_atomic(url_file, {"url": monitor.url, "peer_id": str(dht.peer_id)})
        logger.info(f"watching run {config.run_id}; history in {config.monitor.db_path}")
        print(f"swarm monitor: dashboard at {monitor.url}", flush=True)
        print(f"  JSON {monitor.url}api/swarm | Prometheus {monitor.url}metrics | CSV {monitor.url}export/swarm.csv",
              flush=True)
        while not stop.event.wait(LIVENESS_PERIOD):
            if not dht.is_alive():
                raise SwarmError("the DHT process of this monitor died; restart it")
            check_alive(monitor, dht.rejoin)
        stop.disarm()
    finally:
        monitor.shutdown()
        if dht is not None:
            shutdown_dht(dht)
    logger.info("monitor stopped; its history stays in the database")


def export_csv(config: SwarmConfig, directory: Path) -> None:
    path = Path(config.monitor.db_path)
    if not path.is_file():
        raise MonitorError(f"no monitor history at {path} (monitor.db_path); nothing to export")
    history = History(path, config.run_id)
    try:
        for written in history.export_csv(directory):
            print(written, flush=True)
    finally:
        history.close()
