"""Who leads a round, what a member may declare and what a peer may ask for (swarm.averaging.matchmaking,
.service).

Leadership used to go to the smallest peer id, and an Ed25519 id (identity multihash, first byte 0)
sorts below every RSA id (sha2-256 multihash, first byte 0x12): one such peer led every round.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID

from swarm.averaging import wire
from swarm.averaging.group import MAX_WEIGHT
from swarm.averaging.matchmaking import leader_rank
from swarm.averaging.service import AveragingService

pytestmark = pytest.mark.timeout(120)


def rsa_like_id() -> PeerID:
    return PeerID(bytes([0x12, 0x20]) + os.urandom(32))


def test_no_peer_id_leads_every_round():
    ed25519 = PeerID(bytes([0x00, 0x24]) + os.urandom(36))  # sorts below every RSA id
    peers = [ed25519] + [rsa_like_id() for _ in range(3)]
    assert min(peers, key=lambda peer: peer.to_bytes()) == ed25519  # what the old rule chose, every round
    leaders = Counter(min(peers, key=lambda peer: leader_rank("run", round_number, peer)) for round_number in range(400))
    assert set(leaders) == set(peers), "every peer leads some rounds"
    assert max(leaders.values()) < 200, leaders  # about 100 each; no peer leads most rounds
    # the same on every peer, and different in another run
    assert leader_rank("run", 7, ed25519) == leader_rank("run", 7, PeerID(ed25519.to_bytes()))
    assert leader_rank("run", 7, ed25519) != leader_rank("other", 7, ed25519)


@pytest.fixture
def two_services():
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = None
    services = []
    try:
        second = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                              initial_peers=[str(maddr) for maddr in first.get_visible_maddrs()])
        for dht in (first, second):
            services.append(AveragingService(dht=dht, run_id="mm-test", chunk_timeout=2.0, request_timeout=1.0).start())
        yield services
    finally:
        for service in services:
            service.shutdown()
        for dht in (second, first):
            if dht is not None:
                dht.shutdown()


@pytest.mark.parametrize("weight", [1e30, float(2**53) * 2, -1.0, float("inf")])
def test_a_join_declaring_an_impossible_weight_is_refused(two_services, weight):
    victim, attacker = two_services

    async def join():
        stream = await attacker._stub(victim.peer_id).rpc_join(wire.request(round=0, weight=weight))
        return [wire.metadata_of(message) async for message in stream]

    replies = attacker._call(join(), 30)
    assert replies == [{"error": "malformed join request"}]
    assert MAX_WEIGHT == 2.0**53


def test_a_donor_serves_one_state_download_per_peer_at_a_time(two_services):
    """Each download streams the whole state: a peer asking again while its first download runs is
    refused (and counted), and may ask again once it is done."""
    donor, asker = two_services
    state = torch.randn(4 << 20)  # 16 MiB: the first download is still streaming when the second asks
    donor.state_provider = lambda: ({"round": 1}, [state])
    outcomes: list = []

    def download():
        try:
            outcomes.append(asker.download_state(donor.peer_id, timeout=60, max_bytes=64 << 20))
        except Exception as e:  # noqa: BLE001 - the refusal is what this test looks for
            outcomes.append(e)

    threads = [threading.Thread(target=download) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert len(outcomes) == 2 and len(errors) == 1 and "busy" in str(errors[0]), outcomes
    assert donor.refused == {"state-limit": 1}
    _, tensors = asker.download_state(donor.peer_id, timeout=60, max_bytes=64 << 20)
    assert torch.equal(tensors[0], state)
