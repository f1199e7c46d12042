"""Swarm stats end to end: a bootstrap peer, two trainers and `swarm monitor`, as real processes.

The four peers (the most a test swarm may have here) are started once for this module and shared by
its tests: the JSON API and Prometheus /metrics, `swarm status --json`, the dashboard in a real
headless Chromium, and, last, a monitor restart that must keep its history.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DEBUG_CONFIG, REPO, Swarm, run_cli
from harness.processes import PeerProcess, wait_for

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)

TRAINERS = ("alice", "bob")
MIN_LOSS_MOVE = 0.3  # nats/byte: the debug model's loss falls by more than 1 within ten epochs
ARTIFACTS = REPO / "tests" / "artifacts"


@dataclass
class Watched:
    swarm: Swarm
    address: str
    trainers: dict[str, PeerProcess]
    peer_ids: dict[str, str]
    monitor: PeerProcess
    url: str

    def alive(self) -> list[PeerProcess]:
        return [*self.trainers.values(), self.monitor]


@pytest.fixture(scope="module")
def watched(module_swarm: Swarm) -> Watched:
    _, address = module_swarm.bootstrap()
    trainers = {name: module_swarm.trainer(name, [address], f"peer.display_name={name}", "data.num_shards=2",
                                           f"data.shard_index={index}")
                for index, name in enumerate(TRAINERS)}
    monitor, url = module_swarm.monitor("monitor", [address])
    peer_ids = {name: wait_for(lambda name=name: (status := module_swarm.status(name)) and status["peer_id"],
                               timeout=120, what=f"{name} to start training", alive=list(trainers.values()))
                for name in TRAINERS}
    return Watched(module_swarm, address, trainers, peer_ids, monitor, url)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str) -> dict:
    status, body = get(url)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


def swarm_ready(watched: Watched, min_epoch: int):
    """The latest view once it shows both trainers at ``min_epoch``, each with an averaging round, and
    a loss that has moved, else None."""
    info = get_json(watched.url + "api/swarm")
    view = info["view"]
    if view is None:
        return None
    # Each peer's record is up to a metrics period plus a monitor period old, and a debug epoch can
    # take under 2 s, so a snapshot may show one trainer a couple of epochs behind the other: wait
    # for every trainer to report ``min_epoch`` rather than judge their lag on one snapshot.
    epochs = {peer["peer_id"]: peer["epoch"] for peer in view["peers"]}
    if any((epochs.get(peer_id) or 0) < min_epoch for peer_id in watched.peer_ids.values()):
        return None
    # A trainer that started first trains alone (a debug epoch then takes about a second) until the
    # other one is up: the epoch alone does not say that they have averaged yet.
    rounds = {peer["peer_id"]: peer["rounds_ok"] for peer in view["peers"]}
    if any((rounds.get(peer_id) or 0) < 1 for peer_id in watched.peer_ids.values()):
        return None
    losses = [row["loss"] for row in get_json(watched.url + "api/history")["swarm"] if row["loss"] is not None]
    if len(losses) < 3 or max(losses) - min(losses) < MIN_LOSS_MOVE:
        return None
    return view, losses


def metric_samples(text: str) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


@pytest.mark.timeout(400)
def test_api_and_metrics_report_both_trainers_epoch_and_a_falling_loss(watched: Watched):
    view, losses = wait_for(lambda: swarm_ready(watched, min_epoch=4), timeout=300,
                            what="the monitor to show both trainers at epoch 4 and a moving loss", alive=watched.alive())
    assert losses[-1] < losses[0] - MIN_LOSS_MOVE, losses
    peers = {peer["peer_id"]: peer for peer in view["peers"]}
    for name, peer_id in watched.peer_ids.items():
        peer = peers[peer_id]
        assert (peer["display_name"], peer["role"], peer["state"], peer["device"]) == (name, "volunteer", "running", "cpu")
        assert peer["epoch"] >= 4 and peer["samples_total"] > 0, peer
        assert peer["samples_per_second"] > 0 and peer["loss"] is not None and peer["reachability"] == "direct", peer
        assert peer["rounds_ok"] >= 1, f"{name} counted no averaging round: {peer}"
        if shutil.which("ss"):
            assert peer["bytes_sent"] > 0 and peer["bytes_received"] > 0, peer
    assert view["totals"]["by_role"] == {"bootstrap": 1, "volunteer": 2}
    assert view["flagged"] == [] and view["refused"] == {} and view["totals"]["refused"] == {}

    status, body = get(watched.url + "metrics")
    assert status == 200
    samples = metric_samples(body.decode())
    online = {sample.labels["role"]: sample.value for sample in samples["swarm_peers_online"]}
    assert online == {"bootstrap": 1, "volunteer": 2}
    assert samples["swarm_epoch"][0].value >= 4 and samples["swarm_loss"][0].value > 0
    epochs = {sample.labels["peer_id"]: sample.value for sample in samples["swarm_peer_epoch"]}
    assert set(watched.peer_ids.values()) <= set(epochs)
    rounds_ok = {sample.labels["peer_id"]: sample.value for sample in samples["swarm_peer_averaging_rounds_total"]
                 if sample.labels["outcome"] == "ok"}
    assert all(rounds_ok[peer_id] >= 1 for peer_id in watched.peer_ids.values()), rounds_ok


@pytest.mark.timeout(120)
def test_api_answers_bad_requests_with_clear_errors(watched: Watched):
    for path, code, fragment in [
        ("api/history?points=abc", 400, "points must be an integer"),
        ("api/history?since=-5", 400, "since must be at least 0"),
        ("api/history?points=999999", 400, "points must be between 1 and 5000"),
        ("export/secrets.csv", 400, "no table 'secrets'"),
        ("static/../../swarm/config.py", 404, "no such"),
        ("nowhere", 404, "no such page"),
    ]:
        status, body = get(watched.url + path)
        assert status == code and fragment in json.loads(body)["error"], (path, status, body)
    request = urllib.request.Request(watched.url + "api/swarm", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 405


@pytest.mark.timeout(200)
def test_status_json_lists_the_peers(watched: Watched):
    wait_for(lambda: swarm_ready(watched, min_epoch=1), timeout=150, what="both trainers in the swarm",
             alive=watched.alive())
    # the JSON and the table side by side: each `swarm status` spends most of its time starting up
    command = [sys.executable, "-m", "peers", "status", "--config", str(DEBUG_CONFIG), "--initial-peers", watched.address]
    runs = [subprocess.Popen(command + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL) for extra in (["--json"], [])]
    try:
        outputs = [run.communicate(timeout=150) for run in runs]
    finally:
        for run in runs:
            run.kill()
    result, table = (subprocess.CompletedProcess(run.args, run.returncode, *output) for run, output in zip(runs, outputs))
    assert result.returncode == 0, result.stderr[-2000:]
    view = json.loads(result.stdout)
    peers = {peer["peer_id"]: peer for peer in view["peers"]}
    assert set(watched.peer_ids.values()) <= set(peers), view
    assert {peers[peer_id]["display_name"] for peer_id in watched.peer_ids.values()} == set(TRAINERS)
    assert view["totals"]["by_role"].get("bootstrap") == 1

    assert table.returncode == 0, table.stderr[-2000:]
    assert "peers online" in table.stdout and all(name in table.stdout for name in TRAINERS), table.stdout


@pytest.mark.timeout(240)
def test_dashboard_in_headless_chromium(watched: Watched, tmp_path: Path):
    browser_module = pytest.importorskip("browser")
    chromium = browser_module.find_chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium), or $SWARM_TEST_CHROMIUM is wrong")
    view, _ = wait_for(lambda: swarm_ready(watched, min_epoch=2), timeout=150, what="a swarm worth showing",
                       alive=watched.alive())
    with browser_module.Browser(chromium, log_path=tmp_path / "chromium.log") as browser:
        browser.navigate(watched.url)
        expected = str(view["totals"]["peers_online"])
        browser.wait_for(f"document.getElementById('peer-count').textContent === '{expected}'", timeout=60,
                         what=f"the live peer count ({expected})")
        points = browser.wait_for(
            "document.querySelector('#loss-chart canvas') && Number(document.getElementById('loss-chart').dataset.points)"
            " >= 4 && Number(document.getElementById('loss-chart').dataset.points)", timeout=60, what="a loss chart")
        first_update = browser.wait_for("document.body.dataset.updated", timeout=30, what="a first refresh")
        browser.wait_for(f"document.body.dataset.updated !== '{first_update}'", timeout=30, what="a live refresh")
        rows = browser.evaluate("Array.from(document.querySelectorAll('#peers tbody tr td:nth-child(2)'))"
                                ".map(cell => cell.textContent)")
        assert set(TRAINERS) <= set(rows), rows
        assert "2 volunteer" in browser.evaluate("document.getElementById('peer-roles').textContent")
        browser.screenshot(tmp_path / "dashboard.png", ARTIFACTS / "dashboard.png")
        assert browser.console_errors == [], browser.console_errors
    assert points >= 4
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_monitor_restart_keeps_history_and_exports_csv(watched: Watched, tmp_path: Path):
    """Runs last in this module: it replaces the module's monitor with a restarted one."""
    wait_for(lambda: len(get_json(watched.url + "api/history")["swarm"]) >= 5, timeout=120,
             what="five collections", alive=watched.alive())
    before = get_json(watched.url + "api/history")["swarm"]
    contributed_before = {row["peer_id"]: row["contributed"] for row in get_json(watched.url + "api/peers")["peers"]}

    watched.monitor.signal(signal.SIGTERM)
    assert watched.monitor.proc.wait(30) == 0, watched.monitor.log_tail()
    wait_for(lambda: not watched.monitor.group_members(), timeout=10, what="the monitor's p2pd to exit")
    stopped_at = time.time()

    database = watched.swarm.workdir / "monitor.sqlite"
    export = run_cli("monitor", "--config", str(DEBUG_CONFIG), "--set", f"monitor.db_path={database}",
                     "--export-csv", str(tmp_path / "csv"), timeout=60)
    assert export.returncode == 0, export.stderr[-2000:]
    rows = (tmp_path / "csv" / "swarm.csv").read_text().splitlines()
    assert rows[0].startswith("time,peers_online,") and len(rows) - 1 >= len(before)
    assert len((tmp_path / "csv" / "peer_samples.csv").read_text().splitlines()) > len(before)

    watched.monitor, watched.url = watched.swarm.monitor("monitor", [watched.address])
    after = wait_for(lambda: (rows := get_json(watched.url + "api/history")["swarm"]) and rows[-1]["time"] > stopped_at
                     and rows, timeout=120, what="a collection after the restart", alive=watched.alive())
    assert {row["time"] for row in before} <= {row["time"] for row in after}, "history from before the restart is gone"
    contributed_after = {row["peer_id"]: row["contributed"] for row in get_json(watched.url + "api/peers")["peers"]}
    for peer_id, contributed in contributed_before.items():
        assert contributed_after[peer_id] >= contributed, (peer_id, contributed, contributed_after[peer_id])
