"""A network partition: a DiLoCo peer's link goes down, both sides keep training, and when the link
returns the swarm becomes one again, on one model, within a bounded time. Real namespaces on a bridge."""

from __future__ import annotations

import sys
import time

import pytest

from harness.netlab import Lab, available
from harness.processes import wait_for

WHY_NOT = available()
pytestmark = [pytest.mark.swarm, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]

DILOCO = ("averaging.mode=diloco", "diloco.inner_steps=10", "averaging.compression=fp16",
          "diloco.refresh_period=0.5", "averaging.chunk_timeout=4")
REUNITE_WITHIN = 90.0  # seconds from the link's return to one shared state


@pytest.fixture
def lab():
    with Lab(3, rate=None) as hosts:  # uncapped links, one of which the test cuts
        yield hosts


def state_of(swarm, name):
    status = swarm.status(name) or {}
    return status.get("epoch", -1), status.get("averaging", {}).get("extra", {}).get("state_hash")


@pytest.mark.timeout(420)
def test_partitioned_peer_trains_alone_then_rejoins_one_model(swarm, lab):
    listen = lambda host: f"network.listen_host={lab.ip(host)}"  # noqa: E731
    cli = lambda host: lab.command(host, sys.executable, "-m", "peers")  # noqa: E731
    _, address = swarm.bootstrap("--set", listen(0), program=cli(0))
    peers = {name: swarm.trainer(name, [address], *DILOCO, listen(host), program=cli(host))
             for host, name in enumerate("abc")}
    rounds = lambda name: state_of(swarm, name)[0]  # noqa: E731
    wait_for(lambda: min(rounds(name) for name in "abc") >= 2, timeout=180, what="round 2 everywhere",
             alive=list(peers.values()))

    lab.link(2, up=False)  # c is on its own now
    cut_at = {name: rounds(name) for name in "abc"}
    wait_for(lambda: all(rounds(name) >= cut_at[name] + 2 for name in "abc"), timeout=150,
             what="both sides to advance two rounds while partitioned", alive=list(peers.values()))
    assert state_of(swarm, "c")[1] != state_of(swarm, "a")[1], "the two sides cannot share a state while apart"

    lab.link(2, up=True)
    restored = time.monotonic()

    def one_model():
        states = {state_of(swarm, name) for name in "abc"}
        return len(states) == 1 and None not in {hash_ for _, hash_ in states}

    wait_for(one_model, timeout=REUNITE_WITHIN, period=0.25, what="one model again after the link returned",
             alive=list(peers.values()))
    print(f"reunited {time.monotonic() - restored:.1f}s after the link returned")
    assert swarm.status("c")["averaging"]["state_downloads"] >= 1 or swarm.status("a")["averaging"]["state_downloads"] >= 1
