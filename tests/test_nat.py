"""Peers at home behind NAT: real routers (network namespaces masquerading with iptables, no port
forward, :class:`harness.netlab.NatLab`), the real CLI, default settings. A peer at home finds out by
itself that the swarm cannot reach it (a dial-back fails) and joins through a relay on the bootstrap
peer; two peers in different homes average with each other through it; a late joiner at home gets
the swarm's state (all in DiLoCo mode); a home peer in sync mode (hivemind.Optimizer, the gradient
all-reduce through the relay) whose router goes down for 20 s comes back by itself. Needs root."""

from __future__ import annotations

import sys
import time

import pytest

from harness.netlab import NatLab, nat_available
from harness.processes import wait_for

WHY_NOT = nat_available()
pytestmark = [pytest.mark.swarm, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]

SYNC = ("averaging.mode=sync", "averaging.compression=fp16")
DILOCO = ("averaging.mode=diloco", "diloco.inner_steps=10", "averaging.compression=fp16",
          "diloco.refresh_period=0.5", "averaging.chunk_timeout=4")
BOOTSTRAP, PUBLIC = 0, 1  # public hosts of the lab; homes 0 and 1 hold one host each


@pytest.fixture
def lab():
    with NatLab(public=2, homes=(1, 1), rate="100mbit") as hosts:  # the benchmarks' links
        yield hosts


def start(swarm, lab, host, name=None, address=None, mode=DILOCO):
    cli = lab.command(host, sys.executable, "-m", "peers")
    listen = f"network.listen_host={lab.ip(host)}"
    if name is None:
        return swarm.bootstrap("--set", listen, program=cli)
    return swarm.trainer(name, [address], *mode, listen, program=cli)


def state(swarm, name):
    status = swarm.status(name) or {}
    return status.get("epoch", -1), (status.get("averaging", {}).get("extra") or {}).get("state_hash")


def averaged(swarm, name) -> int:
    return ((swarm.status(name) or {}).get("averaging") or {}).get("rounds_ok", 0)


def agree(swarm, names, at_least):
    states = {state(swarm, name) for name in names}
    return len(states) == 1 and next(iter(states))[0] >= at_least and None not in {hash_ for _, hash_ in states}


def joined(swarm, name, started):
    """Seconds from start until the peer's first status (its DHT up, the relay decided)."""
    wait_for(lambda: swarm.status(name), timeout=240, what=f"{name} to join")
    return time.monotonic() - started


@pytest.mark.timeout(600)
def test_home_peers_average_through_a_relay_and_a_late_joiner_at_home_gets_the_state(swarm, lab):
    _, address = start(swarm, lab, BOOTSTRAP)
    t0 = time.monotonic()
    peers = {"public": start(swarm, lab, PUBLIC, "public", address),
             "home": start(swarm, lab, lab.home_host(0), "home", address)}
    join = {name: joined(swarm, name, t0) for name in peers}
    assert swarm.status("public")["reachability"] == "direct"
    assert swarm.status("home")["reachability"] == "relayed", "the home peer should have found it is behind NAT"

    wait_for(lambda: agree(swarm, peers, 2) and averaged(swarm, "home") >= 1, timeout=300,
             what="public and home peers averaging together", alive=list(peers.values()))
    relay_before = lab.counters(BOOTSTRAP)
    epoch_before, t1 = state(swarm, "public")[0], time.monotonic()

    t2 = time.monotonic()
    peers["late"] = start(swarm, lab, lab.home_host(1), "late", address)  # another home: reaches "home" via the relay
    join["late"] = joined(swarm, "late", t2)
    assert swarm.status("late")["reachability"] == "relayed"
    wait_for(lambda: agree(swarm, peers, epoch_before + 1) and averaged(swarm, "late") >= 1, timeout=300,
             what="the late joiner at home on the swarm's state, averaging with both", alive=list(peers.values()))
    rounds = state(swarm, "public")[0] - epoch_before
    relayed = [after - before for before, after in zip(relay_before, lab.counters(BOOTSTRAP))]
    print(f"join s: {({name: round(seconds, 1) for name, seconds in join.items()})}; "
          f"{(time.monotonic() - t1) / max(rounds, 1):.1f} s/round over {rounds} rounds with two homes; "
          f"bootstrap (relay) sent/received {relayed[0] / 1e6:.1f}/{relayed[1] / 1e6:.1f} MB meanwhile")


@pytest.mark.timeout(600)
def test_sync_mode_home_peer_whose_router_goes_down_for_20s_rejoins_by_itself(swarm, lab):
    _, address = start(swarm, lab, BOOTSTRAP)
    t0 = time.monotonic()
    peers = {"public": start(swarm, lab, PUBLIC, "public", address, mode=SYNC),
             "home": start(swarm, lab, lab.home_host(0), "home", address, mode=SYNC)}
    join = {name: joined(swarm, name, t0) for name in peers}
    assert swarm.status("home")["reachability"] == "relayed"
    wait_for(lambda: min(swarm.epoch(name) for name in peers) >= 1 and averaged(swarm, "home") >= 1, timeout=300,
             what="public and home peers averaging gradients together", alive=list(peers.values()))
    print(f"sync mode join s: {({name: round(seconds, 1) for name, seconds in join.items()})}")

    lab.router(0, up=False)
    time.sleep(20)  # the fault itself: the home's internet is gone this long
    lab.router(0, up=True)
    back, rounds_before = time.monotonic(), averaged(swarm, "home")
    epoch = max(swarm.epoch(name) for name in peers)
    wait_for(lambda: averaged(swarm, "home") > rounds_before and min(swarm.epoch(name) for name in peers) > epoch,
             timeout=240,
             what="the home peer averaging with the public one again", alive=list(peers.values()))
    print(f"averaging again {time.monotonic() - back:.1f}s after the router came back")
