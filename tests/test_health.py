"""`swarm health`, the container's HEALTHCHECK: alive and connected is 0, anything else is 1 and one line."""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import run_cli
from harness.processes import wait_for
from peers.health import assess

NOW = 1_000_000.0
TRAINER = {"peer_id": "QmPeerAbc123", "role": "volunteer", "epoch": 4, "samples": 640, "finished": False,
           "connected_peers": 2, "initial_peers": 1, "updated_at": NOW - 3}


@pytest.mark.parametrize("change, healthy, fragment", [
    ({}, True, "connected to 2 peers, epoch 4, 640 samples"),
    ({"updated_at": NOW - 45}, False, "status is 45s old"),
    ({"finished": True}, False, "has left the swarm"),
    ({"connected_peers": 0}, False, "connected to no peer"),
    ({"connected_peers": None}, False, "its DHT did not answer"),
    ({"connected_peers": 0, "initial_peers": 0}, True, "connected to 0 peers"),  # the first peer of a swarm
])
def test_assess(change, healthy, fragment):
    verdict, reason = assess({**TRAINER, **change}, now=NOW)
    assert verdict is healthy and fragment in reason


def test_no_status_yet_is_unhealthy():
    assert assess(None, now=NOW)[0] is False


@pytest.mark.timeout(60)
def test_cli_exit_codes(tmp_path):
    status = tmp_path / "status.json"
    result = run_cli("health", "--status-file", str(status))
    assert (result.returncode, result.stdout.count("\n")) == (1, 1) and "no status yet" in result.stdout

    status.write_text(json.dumps({**TRAINER, "updated_at": time.time()}))
    result = run_cli("health", env={"SWARM_STATUS_FILE": str(status)})
    assert result.returncode == 0 and result.stdout.startswith("healthy: volunteer Abc123: "), result.stdout

    status.write_text(json.dumps({**TRAINER, "updated_at": time.time() - 20}))
    assert run_cli("health", "--status-file", str(status), "--max-age", "10").returncode == 1

    status.write_text("{half a stat")
    assert run_cli("health", "--status-file", str(status)).returncode == 1


@pytest.mark.swarm
@pytest.mark.timeout(180)
def test_real_peers_report_health_through_their_status_files(swarm):
    bootstrap_status = swarm.workdir / "bootstrap-status.json"
    bootstrap, _ = swarm.bootstrap("--status-file", str(bootstrap_status))
    health = run_cli("health", "--status-file", str(bootstrap_status))
    assert health.returncode == 0, f"the first peer of a swarm is healthy alone: {health.stdout}"

    # joins through the address file the bootstrap wrote, as the compose file's trainers do
    trainer = swarm.trainer("a", [], extra=("--initial-peers-file", str(swarm.workdir / "bootstrap.json")))
    wait_for(lambda: (s := swarm.status("a")) and s["connected_peers"], timeout=120,
             what="the trainer to connect", alive=[trainer, bootstrap])
    trainer_status = str(swarm.workdir / "a" / "status.json")
    health = run_cli("health", "--status-file", trainer_status)
    assert health.returncode == 0 and "connected to" in health.stdout, health.stdout
    assert swarm.status("a")["initial_peers"] == 1

    trainer.signal(signal.SIGTERM)
    assert trainer.proc.wait(30) == 0, trainer.log_tail()
    health = run_cli("health", "--status-file", trainer_status)
    assert health.returncode == 1 and "has left the swarm" in health.stdout
