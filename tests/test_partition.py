"""A network partition: a DiLoCo peer's link goes down, both sides keep training, and when the link
returns the swarm becomes one again, on one model, within a bounded time. Real namespaces on a bridge."""

from __future__ import annotations

import time

import pytest

import netns
from peers.processes import wait_for

OK, WHY = netns.available()
pytestmark = [pytest.mark.swarm, pytest.mark.skipif(not OK, reason=WHY)]

DILOCO = ("averaging.mode=diloco", "diloco.inner_steps=10", "averaging.compression=fp16",
          "diloco.refresh_period=0.5", "averaging.chunk_timeout=4")
REUNITE_WITHIN = 90.0  # seconds from the link's return to one shared state


@pytest.fixture
def bridge():
    network = netns.Bridge(3)
    yield network
    network.close()


def state_of(swarm, name):
    status = swarm.status(name) or {}
    return status.get("epoch", -1), status.get("averaging", {}).get("extra", {}).get("state_hash")


@pytest.mark.timeout(420)
def test_partitioned_peer_trains_alone_then_rejoins_one_model(swarm, bridge):
    listen = lambda host: f"network.listen_host={bridge.address(host)}"  # noqa: E731
    _, address = swarm.bootstrap("--set", listen(0), program=bridge.program(0))
    peers = {name: swarm.trainer(name, [address], *DILOCO, listen(host), program=bridge.program(host))
             for host, name in enumerate("abc")}
    rounds = lambda name: state_of(swarm, name)[0]  # noqa: E731
    wait_for(lambda: min(rounds(name) for name in "abc") >= 2, timeout=180, what="round 2 everywhere",
             alive=list(peers.values()))

    bridge.cut(2)  # c is on its own now
    cut_at = {name: rounds(name) for name in "abc"}
    wait_for(lambda: all(rounds(name) >= cut_at[name] + 2 for name in "abc"), timeout=150,
             what="both sides to advance two rounds while partitioned", alive=list(peers.values()))
    assert state_of(swarm, "c")[1] != state_of(swarm, "a")[1], "the two sides cannot share a state while apart"

    bridge.restore(2)
    restored = time.monotonic()

    def one_model():
        states = {state_of(swarm, name) for name in "abc"}
        return len(states) == 1 and None not in {hash_ for _, hash_ in states}

    wait_for(one_model, timeout=REUNITE_WITHIN, period=0.25, what="one model again after the link returned",
             alive=list(peers.values()))
    print(f"reunited {time.monotonic() - restored:.1f}s after the link returned")
    assert swarm.status("c")["averaging"]["state_downloads"] >= 1 or swarm.status("a")["averaging"]["state_downloads"] >= 1
