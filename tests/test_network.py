"""Addresses and identities: validated before anything starts; a bootstrap peer keeps its peer id; a
peer whose link was down finds its way back into the DHT."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from harness.processes import wait_for
from swarm.config.multiaddrs import parse_peer_multiaddr, split_peer_list
from swarm.config.schema import NetworkConfig
from swarm.net.dht import shutdown_dht, start_dht

PEER_ID = "12D3KooWGUeQLTE63eTY7cBSuAeajwMUgUa84rPVAN5NJhocoMVi"


@pytest.mark.parametrize("text", [
    f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}",
    f"/ip6/::1/tcp/31337/p2p/{PEER_ID}",
    f"/dns4/peer.example.org/tcp/31337/p2p/{PEER_ID}",
    f"/ip4/127.0.0.1/udp/31337/quic-v1/p2p/{PEER_ID}",
])
def test_valid_peer_addresses(text):
    assert str(parse_peer_multiaddr(text)) == text


@pytest.mark.parametrize("text, fragment", [
    ("/ip4/127.0.0.1/tcp/31337", "no /p2p/<peer id>"),
    ("/ip4/300.0.0.1/tcp/1/p2p/" + PEER_ID, "malformed"),
    ("127.0.0.1:31337", "malformed"),
    ("/ip4/127.0.0.1/tcp/1/p2p/not-a-peer-id", "malformed"),
])
def test_invalid_peer_addresses(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_peer_multiaddr(text)


def test_peer_lists_from_environment_strings():
    assert split_peer_list("a, b c,,d") == ["a", "b", "c", "d"]
    assert split_peer_list(["a", "b"]) == ["a", "b"]


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_bootstrap_keeps_its_peer_id_across_restarts_and_leaves_cleanly(swarm):
    first, address = swarm.bootstrap()
    first.signal(signal.SIGTERM)
    assert first.proc.wait(20) == 0, first.log_tail()
    assert not first.group_members(), "p2pd or the DHT process outlived the bootstrap peer"

    second, second_address = swarm.bootstrap()
    assert second_address.rsplit("/p2p/", 1)[1] == address.rsplit("/p2p/", 1)[1]
    second.signal(signal.SIGINT)
    assert second.proc.wait(20) == 0, second.log_tail()


async def _forget_everyone(_dht, node) -> None:
    """What a DHT node does to peers during a partition: every failed request drops one from its table."""
    table = node.protocol.routing_table
    for node_id in list(table.uid_to_peer_id):
        del table[node_id]


async def _known_peers(_dht, node) -> set[str]:
    return {peer_id.to_base58() for peer_id in node.protocol.routing_table.peer_id_to_uid}


@pytest.mark.timeout(120)
def test_a_peer_forgotten_by_both_sides_comes_back_through_its_initial_peers():
    nodes = [start_dht(NetworkConfig(listen_host="127.0.0.1"))]
    try:
        first = nodes[0]
        address = next(str(maddr) for maddr in first.get_visible_maddrs() if "/127.0.0.1/" in str(maddr))
        nodes.append(start_dht(NetworkConfig(listen_host="127.0.0.1", initial_peers=[address], rejoin_period=1.0)))
        second = nodes[1]
        ids = first.peer_id.to_base58(), second.peer_id.to_base58()
        assert ids[0] in second.run_coroutine(_known_peers)
        for dht in (first, second):  # after a partition neither side knows the other
            dht.run_coroutine(_forget_everyone)
        assert not first.run_coroutine(_known_peers) and not second.run_coroutine(_known_peers)
        wait_for(lambda: ids[0] in second.run_coroutine(_known_peers) and ids[1] in first.run_coroutine(_known_peers),
                 timeout=30, what="the two DHT nodes to know each other again")
    finally:
        for node in reversed(nodes):
            shutdown_dht(node)


@pytest.mark.timeout(120)
def test_the_rejoin_loop_stops_with_shutdown_dht():
    first = start_dht(NetworkConfig(listen_host="127.0.0.1"))
    second = None
    try:
        assert first.rejoin is None, "a peer without initial peers has no one to rejoin"
        address = next(str(maddr) for maddr in first.get_visible_maddrs() if "/127.0.0.1/" in str(maddr))
        second = start_dht(NetworkConfig(listen_host="127.0.0.1", initial_peers=[address], rejoin_period=0.2))
        rejoin = second.rejoin
        assert rejoin.is_alive()
        assert rejoin.wait_ready(30), "a first round of pings"
        started = time.monotonic()
        shutdown_dht(second)
        assert time.monotonic() - started < 15 and not rejoin.is_alive() and not second.is_alive()
        assert "rejoin" not in {thread.name for thread in threading.enumerate()}
        rejoin.check()  # stopped, not died
    finally:
        if second is not None and second.is_alive():
            shutdown_dht(second)
        shutdown_dht(first)


async def _ask_raw(_dht, node, peer: str, metadata: bytes) -> dict:
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2
    from hivemind.utils.serializer import MSGPackSerializer

    from swarm.net.reachability import DIAL_BACK
    response = await node.p2p.call_protobuf_handler(PeerID.from_base58(peer), DIAL_BACK,
                                                    runtime_pb2.ExpertRequest(metadata=metadata), runtime_pb2.ExpertResponse)
    return MSGPackSerializer.loads(response.metadata)


@pytest.mark.timeout(120)
def test_dial_back_tells_a_peer_whether_the_swarm_can_connect_to_it_and_refuses_hostile_requests():
    from functools import partial

    from hivemind.utils.serializer import MSGPackSerializer

    from swarm.net.dht import reachability
    from swarm.net.reachability import MAX_PORTS, _ask, listening_ports, reachable

    first = start_dht(NetworkConfig(listen_host="127.0.0.1"))
    second = None
    try:
        address = next(str(maddr) for maddr in first.get_visible_maddrs() if "/127.0.0.1/" in str(maddr))
        second = start_dht(NetworkConfig(listen_host="127.0.0.1", initial_peers=[address]))  # null: decide
        assert reachability(second) == "direct", "a peer on the same host as its initial peer is reachable"
        assert reachable(second, [address]) is True
        first_id = first.peer_id.to_base58()
        import socket
        with socket.socket() as closed:  # a port nobody listens on: what a router without a forwarded port looks like
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        assert second.run_coroutine(partial(_ask, peer=first_id, ports=[port])) is False
        assert listening_ports(second) and port not in listening_ports(second)

        hostile = [MSGPackSerializer.dumps({"ports": list(range(1, MAX_PORTS + 2))}),  # too many ports
                   MSGPackSerializer.dumps({"ports": [0]}), MSGPackSerializer.dumps({"ports": ["80"]}),
                   b"\xc1not msgpack", MSGPackSerializer.dumps({"ports": [1] * 1000})]  # over the size cap
        for metadata in hostile:
            answer = second.run_coroutine(partial(_ask_raw, peer=first_id, metadata=metadata))
            assert "reachable" not in answer and answer.get("error") in ("malformed", "refused"), (metadata[:20], answer)
    finally:
        if second is not None:
            shutdown_dht(second)
        shutdown_dht(first)


def test_a_refusal_that_is_not_about_clocks_is_not_blamed_on_the_clock():
    """hivemind raises DHTValidationError for clocks that differ (with both times) and for other refusals:
    only the first is reported as a clock problem, the others with hivemind's own words."""
    from hivemind.dht.protocol import ValidationError as DHTValidationError

    from swarm.net.dht import _clock_message
    clock = _clock_message(DHTValidationError("local time is off (local: 1000.5, peer: 990.0)"))
    assert "clock is +10.5 s off" in clock
    other = _clock_message(DHTValidationError("some other refusal"))
    assert "clock" not in other and "some other refusal" in other
