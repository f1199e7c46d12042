"""A rogue peer lies in the metrics key and floods a trainer with requests; honest peers refuse both,
the monitor neither crashes nor believes it, and every place that shows the swarm shows the refusals.

The swarm, started once for this module: a bootstrap peer, one DiLoCo trainer (the victim: DiLoCo,
so that its own averaging service answers requests while it trains), `swarm monitor`, and
tests/rogue_peer.py, a real DHT peer in its own process whose validator accepts and serves anything.
It writes a forged record under the victim's own subkey, a correctly signed record claiming the
victim's peer id, a malformed and an oversized one, an implausible one and a plausible one of its
own; and it keeps asking the victim for parts of a group it is not in, more at once than allowed.
The tests look at the monitor's API and /metrics, `swarm status` (table and --json), and the
dashboard in a real headless Chromium.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DEBUG_CONFIG, REPO, Swarm
from harness.processes import PeerProcess, read_json, wait_for

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)

ROGUE = REPO / "tests" / "rogue_peer.py"
FORGED = "FORGED"
REFUSED_KINDS = ("bad_signature", "impersonation", "schema", "oversized")
# what the victim's averaging service says to the rogue's flood, and how it counts it
REFUSED_REQUESTS = {"fetch-not-member": "not yours to fetch", "fetch-limit": "too many open requests"}
# Rounds of about a minute: the monitor flags a trainer more than MAX_EPOCH_LEAD (10) epochs ahead of
# every other one, and the rogue's plausible peer stays at epoch 0 (so a signed peer of no work can get
# an honest lone trainer flagged: the victim would drop out of the peers after about 10 debug rounds).
DILOCO = ("averaging.mode=diloco", "diloco.inner_steps=500")
ARTIFACTS = REPO / "tests" / "artifacts"


@dataclass
class Attacked:
    swarm: Swarm
    address: str
    victim: PeerProcess
    victim_id: str
    monitor: PeerProcess
    url: str
    collections_before: int  # the monitor's collections before the rogue started
    rogue: PeerProcess
    rogue_ids: dict[str, str]

    def alive(self) -> list[PeerProcess]:
        return [self.victim, self.monitor, self.rogue]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def attacked(module_swarm: Swarm) -> Attacked:
    _, address = module_swarm.bootstrap()
    victim = module_swarm.trainer("victim", [address], "peer.display_name=victim", *DILOCO)
    monitor, url = module_swarm.monitor("monitor", [address])
    victim_id = wait_for(lambda: (status := module_swarm.status("victim")) and status["peer_id"], timeout=120,
                         what="the victim to start", alive=[victim])
    wait_for(lambda: (view := get_json(url + "api/swarm")["view"]) and victim_id in {p["peer_id"] for p in view["peers"]},
             timeout=120, what="the monitor to see the victim", alive=[victim, monitor])
    collections_before = get_json(url + "api/swarm")["collections"]

    report_file = module_swarm.workdir / "rogue.json"
    rogue = module_swarm.start("rogue", [address, "swarm-debug", victim_id, str(report_file)],
                               program=(sys.executable, str(ROGUE)))
    report = wait_for(lambda: read_json(report_file), timeout=120, what="the rogue's first attack", alive=[rogue])
    return Attacked(module_swarm, address, victim, victim_id, monitor, url, collections_before, rogue,
                    report["peer_ids"])


def assert_nothing_forged(view: dict, victim_id: str, rogue_ids: dict) -> None:
    shown = view["peers"] + view["left"] + view["flagged"]
    assert not [peer for peer in shown if peer["display_name"] == FORGED], "a forged record was believed"
    for peer in view["peers"] + view["left"]:
        if peer["peer_id"] == victim_id:
            assert peer["display_name"] == "victim" and peer["samples_per_second"] != 999.0, peer
    genuine_ids = {peer["peer_id"] for peer in view["peers"]}
    assert rogue_ids["implausible"] not in genuine_ids, "an implausible record counts as genuine"
    assert not {rogue_ids[kind] for kind in ("malformed", "oversized")} & {peer["peer_id"] for peer in shown}
    assert view["totals"]["samples_per_second"] < 10_000, view["totals"]


def victim_refused_requests(view: dict, victim_id: str) -> dict[str, int]:
    return next((peer["refused_requests"] for peer in view["peers"] if peer["peer_id"] == victim_id), {})


@pytest.mark.timeout(360)
def test_rogue_peer_cannot_forge_records_or_break_the_monitor(attacked: Attacked):
    url, victim_id, rogue_ids = attacked.url, attacked.victim_id, attacked.rogue_ids
    last: dict = {}

    def attack_seen():
        info = get_json(url + "api/swarm")
        view = last["view"] = info["view"]
        assert_nothing_forged(view, victim_id, rogue_ids)  # at every look, not only at the end
        refused_by_peers = view["totals"]["refused"]
        flagged = {peer["peer_id"]: peer for peer in view["flagged"]}
        done = (all(refused_by_peers.get(kind, 0) >= 1 for kind in REFUSED_KINDS)
                and all(victim_refused_requests(view, victim_id).get(reason, 0) >= 1 for reason in REFUSED_REQUESTS)
                and rogue_ids["implausible"] in flagged and sum(view["refused"].values()) >= 1
                and rogue_ids["control"] in {peer["peer_id"] for peer in view["peers"]})
        return (view, flagged, info) if done else None

    try:
        view, flagged, info = wait_for(attack_seen, timeout=150, what="every kind of forgery refused or flagged, and "
                                       "the flood of requests refused", alive=attacked.alive())
    except TimeoutError as e:  # say what was missing
        view = last.get("view") or {}
        seen = {key: view.get(key) for key in ("refused", "totals", "flagged")}
        seen["peers"] = [(peer["peer_id"], peer["display_name"], peer["refused_requests"])
                         for peer in view.get("peers", [])]
        raise AssertionError(f"{e}; the monitor's last view: {seen}") from None
    assert "samples/s" in " ".join(flagged[rogue_ids["implausible"]]["reasons"])
    assert info["collections"] > attacked.collections_before and info["collection_errors"] == 0
    assert view["totals"]["refused_requests"] == victim_refused_requests(view, victim_id)  # no one else was flooded
    # what the victim counts is what the rogue was told: every request of the flood refused, none served
    answers = wait_for(lambda: (requests := read_json(attacked.swarm.workdir / "rogue.json")["requests"])
                       and all(requests.get(text, 0) >= 1 for text in REFUSED_REQUESTS.values()) and requests,
                       timeout=60, what="the rogue to hear both refusals", alive=[attacked.rogue])
    assert "served" not in answers, answers

    # the monitor carries on: more collections, a healthy /healthz, a /metrics that parses
    seen = info["collections"]
    wait_for(lambda: get_json(url + "api/swarm")["collections"] >= seen + 2, timeout=60,
             what="two more collections", alive=[attacked.monitor])
    assert get_json(url + "healthz") == {"ok": True}

    def scrape() -> tuple[set, dict]:
        with urllib.request.urlopen(url + "metrics", timeout=30) as response:
            families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
        records = {sample.labels["reason"] for sample in families["swarm_peer_refused_records"].samples}
        requests = {sample.labels["reason"]: sample.value for sample in families["swarm_peer_refused_requests"].samples
                    if sample.labels["peer"] == victim_id}
        return records, requests

    # a scrape shows the latest collection, which may miss the victim's record for a moment
    records, requests = wait_for(lambda: (scraped := scrape())[1] and scraped, timeout=30,
                                 what="the victim in /metrics", alive=[attacked.monitor])
    assert set(REFUSED_KINDS) <= records, records
    assert all(requests.get(reason, 0) >= 1 for reason in REFUSED_REQUESTS), requests
    assert_nothing_forged(get_json(url + "api/swarm")["view"], victim_id, rogue_ids)
    assert attacked.monitor.poll() is None and attacked.victim.poll() is None


@pytest.mark.timeout(240)
def test_status_shows_what_each_peer_refused(attacked: Attacked):
    wait_for(lambda: all(victim_refused_requests(get_json(attacked.url + "api/swarm")["view"], attacked.victim_id)
                         .get(reason, 0) >= 1 for reason in REFUSED_REQUESTS),
             timeout=150, what="the victim to report the refused flood", alive=attacked.alive())
    # the JSON and the table side by side: each `swarm status` spends most of its time starting up
    command = [sys.executable, "-m", "peers", "status", "--config", str(DEBUG_CONFIG), "--initial-peers",
               attacked.address]
    runs = [subprocess.Popen(command + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL) for extra in (["--json"], [])]
    try:
        outputs = [run.communicate(timeout=150) for run in runs]
    finally:
        for run in runs:
            run.kill()
    (json_out, json_err), (table, table_err) = outputs
    assert runs[0].returncode == 0, json_err[-2000:]
    view = json.loads(json_out)
    victim = next((peer for peer in view["peers"] if peer["peer_id"] == attacked.victim_id), None)
    assert victim is not None, view["peers"]
    assert all(victim["refused_requests"].get(reason, 0) >= 1 for reason in REFUSED_REQUESTS), victim
    assert all(view["totals"]["refused"].get(kind, 0) >= 1 for kind in REFUSED_KINDS), view["totals"]

    assert runs[1].returncode == 0, table_err[-2000:]
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("PEER "))
    row = next((line for line in lines if line.startswith("…" + attacked.victim_id[-8:])), None)
    assert row is not None, table
    assert int(row[header.index("REFUSED"):].split()[0].replace(",", "")) >= len(REFUSED_REQUESTS), table
    summary = next(line for line in lines if line.startswith("refused by the peers: "))
    total = int(summary.removeprefix("refused by the peers: ").split()[0])
    assert total >= len(REFUSED_KINDS) + len(REFUSED_REQUESTS), summary
    assert "records: " in summary and "requests: " in summary, summary
    assert all(f"{reason} " in summary for reason in [*REFUSED_KINDS, *REFUSED_REQUESTS]), summary


@pytest.mark.timeout(240)
def test_dashboard_shows_the_refusals_in_headless_chromium(attacked: Attacked, tmp_path: Path):
    browser_module = pytest.importorskip("browser")
    chromium = browser_module.find_chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium), or $SWARM_TEST_CHROMIUM is wrong")
    wait_for(lambda: all(victim_refused_requests(get_json(attacked.url + "api/swarm")["view"], attacked.victim_id)
                         .get(reason, 0) >= 1 for reason in REFUSED_REQUESTS),
             timeout=150, what="the victim to report the refused flood", alive=attacked.alive())
    with browser_module.Browser(chromium, log_path=tmp_path / "chromium.log") as browser:
        browser.navigate(attacked.url)
        reasons = [*REFUSED_KINDS, *REFUSED_REQUESTS]
        shown = browser.wait_for(
            "(() => { const rows = Array.from(document.querySelectorAll('#refused-reasons tbody tr[data-reason]'));"
            " const counts = Object.fromEntries(rows.map(row => [row.dataset.kind + ' ' + row.dataset.reason,"
            " Number(row.cells[2].textContent.replace(/,/g, ''))]));"
            f" return {json.dumps(reasons)}.every(reason => (counts['record ' + reason] || counts['request ' + reason])"
            " > 0) && counts; })()", timeout=60, what="every refused reason in the dashboard's table")
        assert all(shown.get(f"request {reason}", 0) >= 1 for reason in REFUSED_REQUESTS), shown
        victim_row = browser.wait_for(
            f"(() => {{ const row = document.querySelector("
            f"'#refused-peers tbody tr[data-peer-id=\"{attacked.victim_id}\"]');"
            " return row && Array.from(row.cells).map(cell => cell.textContent); })()",
            timeout=30, what="the victim in the dashboard's refusals by peer")
        assert victim_row[1] == "victim" and int(victim_row[3].replace(",", "")) >= 2, victim_row
        assert all(reason in victim_row[4] for reason in REFUSED_REQUESTS), victim_row
        assert "refused by the peers" in browser.evaluate("document.getElementById('refused').textContent")
        browser.screenshot(tmp_path / "dashboard.png", ARTIFACTS / "dashboard-refusals.png")
        assert browser.console_errors == [], browser.console_errors
