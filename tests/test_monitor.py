"""Swarm stats end to end: a bootstrap peer, two trainers and `swarm monitor`, as real processes.

The four peers (the most a test swarm may have here) are started once for this module and shared by
its tests: the JSON API and Prometheus /metrics, Debian's real ``prometheus`` scraping the monitor with
the shipped docker/prometheus.yml, `swarm status --json`, the dashboard in a real headless Chromium,
and, last, a monitor restart that must keep its history.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import DEBUG_CONFIG, REPO, Swarm, run_cli
from harness.processes import PeerProcess, wait_for

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)

TRAINERS = ("alice", "bob")
MIN_LOSS_MOVE = 0.3  # nats/byte: the debug model's loss falls by more than 1 within ten epochs
ARTIFACTS = REPO / "tests" / "artifacts"
GRAFANA_DASHBOARD = REPO / "docker" / "grafana-dashboard.json"


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
    epochs = {sample.labels["peer"]: sample.value for sample in samples["swarm_peer_epoch"]}
    assert set(watched.peer_ids.values()) <= set(epochs)
    rounds_ok = {sample.labels["peer"]: sample.value for sample in samples["swarm_peer_averaging_rounds_total"]
                 if sample.labels["outcome"] == "ok"}
    assert all(rounds_ok[peer_id] >= 1 for peer_id in watched.peer_ids.values()), rounds_ok


def listening_port(pid: int) -> int | None:
    """The TCP port process ``pid`` listens on (read from /proc: the process was started on port 0)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:  # 0A: LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def prometheus_query(base: str, query: str) -> list[dict]:
    answer = get_json(f"{base}api/v1/query?query={quote(query)}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.timeout(240)
def test_prometheus_scrapes_the_monitor_and_answers_the_grafana_queries(watched: Watched, tmp_path: Path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed (apt-get install --no-install-recommends prometheus)")
    wait_for(lambda: swarm_ready(watched, min_epoch=1), timeout=150, what="both trainers in the swarm",
             alive=watched.alive())
    # the shipped scrape config, pointed at this test's monitor and scraping every second
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0].update(scrape_timeout="1s", static_configs=[{"targets": [urlsplit(watched.url).netloc]}])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = watched.swarm.start("prometheus", [
        f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        "--web.listen-address=127.0.0.1:0"], program=(binary,))
    port = wait_for(lambda: listening_port(prometheus.pid), timeout=60, what="prometheus to listen",
                    alive=[prometheus, *watched.alive()])
    base = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: get(base + "-/ready")[0] == 200, timeout=60, what="prometheus to be ready", alive=[prometheus])
        peer_ids = set(watched.peer_ids.values())
        epochs = wait_for(lambda: peer_ids <= {row["metric"]["peer"] for row in prometheus_query(base, "swarm_peer_epoch")}
                          and prometheus_query(base, "swarm_peer_epoch"), timeout=90,
                          what="prometheus to have scraped both trainers' epochs", alive=[prometheus, *watched.alive()])
        assert all(row["metric"]["job"] == "swarm-monitor" for row in epochs)
        targets = get_json(base + "api/v1/targets")["data"]["activeTargets"]
        assert [target["health"] for target in targets] == ["up"], targets
        named = {row["metric"]["peer"]: row["metric"]["name"]
                 for row in prometheus_query(base, "swarm_peer_loss * on (peer) group_left (name) swarm_peer_info")}
        assert {named[peer_id] for peer_id in peer_ids} == set(TRAINERS), named
        info = {row["metric"]["peer"]: row["metric"] for row in prometheus_query(base, "swarm_peer_info")}
        assert all(info[peer_id]["device"] == "cpu" and info[peer_id]["version"] for peer_id in peer_ids), info
        assert prometheus_query(base, "swarm_peers_online") and prometheus_query(base, "swarm_loss")
        # every query of the shipped Grafana dashboard is valid PromQL over these series; the traffic rates
        # need two scrapes of the counters, so wait for them
        exprs = [target["expr"] for panel in json.loads(GRAFANA_DASHBOARD.read_text())["panels"]
                 for target in panel["targets"]]
        for expr in exprs:
            prometheus_query(base, expr)
        if shutil.which("ss"):
            wait_for(lambda: prometheus_query(base, "sum(rate(swarm_peer_sent_bytes_total[2m]))"), timeout=60,
                     what="a traffic rate", alive=[prometheus])
    finally:
        prometheus.stop()


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


@pytest.mark.timeout(300)
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
        check_researcher_views(browser, watched)
        browser.screenshot(tmp_path / "dashboard.png", ARTIFACTS / "dashboard.png")
        assert browser.console_errors == [], browser.console_errors
    assert points >= 4
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def chart_points(chart: str) -> str:
    return f"Number(document.getElementById('{chart}').dataset.points)"


def check_researcher_views(browser, watched: Watched) -> None:
    """Per-peer and traffic charts with data, the x-axis choice, a zoom that outlives refreshes, and the
    sortable contribution table."""
    for chart in ("peer-loss-chart", "peer-throughput-chart") + (("traffic-chart", "peer-traffic-chart")
                                                                  if shutil.which("ss") else ()):
        browser.wait_for(f"document.querySelector('#{chart} canvas') && {chart_points(chart)} >= 4", timeout=60,
                         what=f"data in {chart}")
    assert browser.evaluate("Number(document.getElementById('peer-loss-chart').dataset.series)") >= 2
    labels = browser.evaluate("state.charts['peer-loss-chart'].series.slice(1).map(series => series.label)")
    assert all(any(label.startswith(name + " ") for label in labels) for name in TRAINERS), labels
    assert len(labels) == len(TRAINERS), f"the bootstrap peer does not train: {labels}"

    for mode, label in (("epoch", "swarm epoch"), ("samples", "samples trained (swarm)"), ("time", "wall-clock time")):
        browser.evaluate(f"(select => {{ select.value = '{mode}'; select.dispatchEvent(new Event('change')); }})"
                         f"(document.getElementById('x-axis'))")
        xs = browser.wait_for(f"state.charts['loss-chart'].series[0].label === '{label}' && "
                              f"{chart_points('peer-loss-chart')} > 0 && state.charts['loss-chart'].data[0]",
                              timeout=30, what=f"the charts against {mode}")
        assert xs == sorted(xs) and len(set(xs)) >= 2, (mode, xs)

    # a drag-zoom ends in uPlot's setScale on x (what its mouse-up handler calls): zoom to the middle
    zoom = browser.evaluate("(plot => { const xs = plot.data[0], min = xs[0] + (xs[xs.length - 1] - xs[0]) / 4, "
                            "max = xs[xs.length - 1] - (xs[xs.length - 1] - xs[0]) / 4; plot.setScale('x', {min, max});"
                            " return [min, max]; })(state.charts['loss-chart'])")
    updated = browser.evaluate("document.body.dataset.updated")
    browser.wait_for(f"document.body.dataset.updated !== '{updated}'", timeout=30, what="a refresh after the zoom")
    kept = browser.evaluate("Object.values(state.charts).map(plot => [plot.scales.x.min, plot.scales.x.max])")
    assert all(abs(low - zoom[0]) < 1e-6 and abs(high - zoom[1]) < 1e-6 for low, high in kept), (zoom, kept)
    browser.evaluate("document.getElementById('reset-zoom').click()")
    assert browser.evaluate("state.zoom") is None
    updated = browser.evaluate("document.body.dataset.updated")
    browser.wait_for(f"document.body.dataset.updated !== '{updated}'", timeout=30, what="a refresh after the reset")
    assert browser.evaluate("state.zoom === null && Object.values(state.charts).every(plot => plot.data[0].length === 0"
                            " || plot.scales.x.max >= plot.data[0][plot.data[0].length - 1])"), "the zoom came back"

    names = "Array.from(document.querySelectorAll('#contributions tbody tr td:nth-child(2)')).map(cell => cell.textContent)"
    assert set(TRAINERS) <= set(browser.evaluate(names))
    named = lambda: [name for name in browser.evaluate(names) if name != "–"]  # noqa: E731 (the bootstrap has none)
    browser.evaluate("document.querySelector('#contributions th[data-key=display_name]').click()")
    ascending = named()
    assert ascending == sorted(ascending) and browser.evaluate(
        "document.querySelector('#contributions th[data-key=display_name]').dataset.sorted") == "ascending"
    browser.evaluate("document.querySelector('#contributions th[data-key=display_name]').click()")
    assert named() == sorted(ascending, reverse=True)
    browser.evaluate("document.querySelector('#contributions th[data-key=contributed]').click()")
    samples = browser.evaluate("Array.from(document.querySelectorAll('#contributions tbody tr td:nth-child(8)'))"
                               ".map(cell => Number(cell.textContent.replace(/,/g, '')))")
    assert samples == sorted(samples, reverse=True) and samples[0] > 0, samples


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
