"""Addresses and identities: validated before anything starts; a bootstrap peer keeps its peer id."""

from __future__ import annotations

import signal

import pytest

from swarm.multiaddrs import parse_peer_multiaddr, split_peer_list

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
