"""A rogue peer lies in the metrics key; honest peers refuse it, and the monitor neither crashes nor believes it.

The swarm: a bootstrap peer, one trainer (the victim), `swarm monitor`, and tests/rogue_peer.py, a
real DHT peer in its own process whose validator accepts and serves anything. It writes a forged
record under the victim's own subkey, a correctly signed record claiming the victim's peer id, a
malformed and an oversized one, an implausible one and a plausible one of its own.
"""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from harness.processes import read_json, wait_for

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)

ROGUE = REPO / "tests" / "rogue_peer.py"
FORGED = "FORGED"
REFUSED_KINDS = ("bad_signature", "impersonation", "schema", "oversized")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


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


@pytest.mark.timeout(360)
def test_rogue_peer_cannot_forge_records_or_break_the_monitor(swarm):
    _, address = swarm.bootstrap()
    victim = swarm.trainer("victim", [address], "peer.display_name=victim")
    monitor, url = swarm.monitor("monitor", [address])
    victim_id = wait_for(lambda: (status := swarm.status("victim")) and status["peer_id"], timeout=120,
                         what="the victim to start", alive=[victim])
    wait_for(lambda: (view := get_json(url + "api/swarm")["view"]) and victim_id in {p["peer_id"] for p in view["peers"]},
             timeout=120, what="the monitor to see the victim", alive=[victim, monitor])
    collections_before = get_json(url + "api/swarm")["collections"]

    report_file = swarm.workdir / "rogue.json"
    rogue = swarm.start("rogue", [address, "swarm-debug", victim_id, str(report_file)], program=(sys.executable, str(ROGUE)))
    report = wait_for(lambda: read_json(report_file), timeout=120, what="the rogue's first attack", alive=[rogue])
    rogue_ids = report["peer_ids"]

    def attack_seen():
        info = get_json(url + "api/swarm")
        view = info["view"]
        assert_nothing_forged(view, victim_id, rogue_ids)  # at every look, not only at the end
        refused_by_peers = view["totals"]["refused"]
        flagged = {peer["peer_id"]: peer for peer in view["flagged"]}
        done = (all(refused_by_peers.get(kind, 0) >= 1 for kind in REFUSED_KINDS)
                and rogue_ids["implausible"] in flagged and sum(view["refused"].values()) >= 1
                and rogue_ids["control"] in {peer["peer_id"] for peer in view["peers"]})
        return (view, flagged, info) if done else None

    view, flagged, info = wait_for(attack_seen, timeout=150, what="every kind of forgery refused or flagged",
                                   alive=[victim, monitor, rogue])
    assert "samples/s" in " ".join(flagged[rogue_ids["implausible"]]["reasons"])
    assert info["collections"] > collections_before and info["collection_errors"] == 0

    # the monitor carries on: more collections, a healthy /healthz, a /metrics that parses
    seen = info["collections"]
    wait_for(lambda: get_json(url + "api/swarm")["collections"] >= seen + 2, timeout=60,
             what="two more collections", alive=[monitor])
    assert get_json(url + "healthz") == {"ok": True}
    with urllib.request.urlopen(url + "metrics", timeout=30) as response:
        families = {family.name: family for family in text_string_to_metric_families(response.read().decode())}
    refused = {sample.labels["reason"] for sample in families["swarm_peer_refused_records"].samples}
    assert set(REFUSED_KINDS) <= refused, refused
    assert_nothing_forged(get_json(url + "api/swarm")["view"], victim_id, rogue_ids)
    assert monitor.poll() is None and victim.poll() is None
