"""Direct links (swarm.net.direct): real TCP sockets on 127.0.0.1, real identities, real DHTs and p2pd."""

from __future__ import annotations

import asyncio
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from swarm.averaging.service import AveragingService
from swarm.config.schema import NetworkConfig
from swarm.net.dht import shutdown_dht, start_dht
from swarm.net.direct import MAX_FRAME, REQUEST, DirectError, DirectServer, connect
from swarm.net.identity import load_identity

pytestmark = pytest.mark.timeout(120)

NAMESPACE = "direct-test"


def echo_server(identity, **kwargs) -> DirectServer:
    async def serve(caller: str, body: bytes):
        yield caller.encode()
        yield body[::-1]
    return DirectServer(private_key=identity.private_key, namespace=NAMESPACE, serve=serve, **kwargs)


async def exchange_once(server_identity, client_identity, *, expected=None, namespace=NAMESPACE, **server_kwargs):
    server = echo_server(server_identity, **server_kwargs)
    port = await server.start("127.0.0.1", 0)
    try:
        channel = await connect("127.0.0.1", port, expected_peer=expected or server_identity.peer_id,
                                private_key=client_identity.private_key, namespace=namespace, timeout=5)
        replies = [body async for body in channel.exchange(b"hello")]
        again = [body async for body in channel.exchange(b"twice")]  # one connection, one exchange after another
        channel.close()
        return replies, again
    finally:
        await server.close()


def test_a_channel_proves_both_ids_and_carries_exchanges_one_after_another():
    server, client = load_identity(None), load_identity(None)
    replies, again = asyncio.run(exchange_once(server, client))
    assert replies == [client.peer_id.encode(), b"olleh"]  # the server learned the client's proven id
    assert again == [client.peer_id.encode(), b"eciwt"]


def test_a_server_that_is_not_the_expected_peer_is_refused():
    server, client, other = load_identity(None), load_identity(None), load_identity(None)
    with pytest.raises(DirectError, match="not"):
        asyncio.run(exchange_once(server, client, expected=other.peer_id))


def test_another_run_namespace_cannot_complete_the_handshake():
    server, client = load_identity(None), load_identity(None)
    with pytest.raises(DirectError):
        asyncio.run(exchange_once(server, client, namespace="another-run"))


def test_a_refused_client_gets_no_answer():
    server, client = load_identity(None), load_identity(None)
    with pytest.raises(DirectError, match="broke off"):
        asyncio.run(exchange_once(server, client, admit=lambda peer: "not in the manifest"))


async def _raw_attack(server_identity, client_identity, frame: bytes) -> bytes:
    """Handshake properly, then send ``frame`` (raw bytes); what the server answers before it closes."""
    server = echo_server(server_identity)
    port = await server.start("127.0.0.1", 0)
    try:
        channel = await connect("127.0.0.1", port, expected_peer=server_identity.peer_id,
                                private_key=client_identity.private_key, namespace=NAMESPACE, timeout=5)
        channel.writer.write(frame)
        await channel.writer.drain()
        answer = await asyncio.wait_for(channel.reader.read(1 << 16), 5)
        channel.close()
        return answer
    finally:
        await server.close()


def test_oversized_and_forged_frames_close_the_connection_unanswered():
    server, client = load_identity(None), load_identity(None)
    too_long = struct.pack(">I", MAX_FRAME + 1)  # announced, never sent: nothing is allocated for it
    assert asyncio.run(_raw_attack(server, client, too_long)) == b""
    forged = bytes([REQUEST]) + b"x" * 40  # not encrypted under the session key
    assert asyncio.run(_raw_attack(server, client, struct.pack(">I", len(forged)) + forged)) == b""


@pytest.fixture
def make_services():
    """``make_services(*direct)``: one averaging service per flag, each on its own DHT (with an identity the
    service can prove), joined through the first; a true flag gives it direct links."""
    dhts, services = [], []

    def make(*direct: bool) -> list[AveragingService]:
        for flag in direct:
            identity = load_identity(None)
            initial = [str(maddr) for maddr in dhts[0].get_visible_maddrs()] if dhts else []
            dhts.append(start_dht(NetworkConfig(listen_host="127.0.0.1", initial_peers=initial), identity=identity))
            services.append(AveragingService(dht=dhts[-1], run_id="direct-test", chunk_timeout=5.0, request_timeout=2.0,
                                             direct=("127.0.0.1", 0) if flag else None,
                                             private_key=identity.private_key).start())
        return services

    try:
        yield make
    finally:
        for service in services:
            service.shutdown()
        for dht in reversed(dhts):
            shutdown_dht(dht)


def average(services: list[AveragingService], round_number: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    everyone = {service.peer_id for service in services}
    with ThreadPoolExecutor(len(services)) as pool:
        groups = list(pool.map(lambda s: s.form_group(round_number, weight=1.0, expected=lambda: everyone, timeout=30),
                               services))
        results = list(pool.map(lambda args: args[0].allreduce(args[1], [args[2]], weight=1.0, timeout=30),
                                zip(services, groups, tensors)))
    for service, group in zip(services, groups):
        service.finish_group(group)
    return [result.tensors[0] for result in results]


@pytest.mark.swarm
def test_round_parts_go_over_direct_links_and_average_the_same(make_services):
    services = make_services(True, True, True)
    tensors = [torch.randn(300_000) for _ in services]  # several 512 KiB chunks per part
    for round_number in range(2):  # the second round reuses the connections of the first
        results = average(services, round_number, tensors)
        for result in results:
            torch.testing.assert_close(result, torch.stack(tensors).mean(0))
    for service in services:
        assert service.fetches["direct"] > 0 and service.fetches["libp2p"] == 0, service.fetches


@pytest.mark.swarm
def test_a_peer_without_direct_links_is_fetched_from_over_libp2p(make_services):
    services = make_services(True, False)
    tensors = [torch.randn(10_000) for _ in services]
    results = average(services, 0, tensors)
    for result in results:
        torch.testing.assert_close(result, torch.stack(tensors).mean(0))
    with_direct, without = services
    assert with_direct.fetches["libp2p"] > 0 and with_direct.fetches["direct"] == 0, with_direct.fetches
    assert without.fetches["libp2p"] > 0, without.fetches


@pytest.mark.swarm
def test_a_direct_link_that_breaks_is_replaced_by_libp2p_within_the_round(make_services):
    services = make_services(True, True)
    tensors = [torch.randn(100_000) for _ in services]
    average(services, 0, tensors)
    assert services[0].fetches == {"direct": services[0].fetches["direct"]}, services[0].fetches
    # the second peer's direct server goes away: the first one's pooled connection to it is dead, and its
    # port refuses new ones; the next round's fetches from it must go over libp2p, with the same result
    services[1]._call(services[1]._direct_server.close(), 10)
    for result in average(services, 1, tensors):
        torch.testing.assert_close(result, torch.stack(tensors).mean(0))
    assert services[0].fetches["libp2p"] > 0, services[0].fetches
    assert not services[0]._pool.usable(services[1].peer_id.to_base58())  # not tried again for a while
    assert services[1].fetches["libp2p"] == 0, services[1].fetches  # the other way still goes direct


@pytest.mark.swarm
def test_state_downloads_go_over_direct_links_too_and_over_libp2p_from_a_peer_without(make_services):
    donor, joiner, old_donor = make_services(True, True, False)
    state = [torch.randn(700_000), torch.arange(10.0)]  # the first one spans several 512 KiB chunks
    for service in (donor, old_donor):
        service.state_provider = lambda: ({"round": 3}, state)
    for source, path in ((donor, "direct"), (old_donor, "libp2p")):
        header, tensors = joiner.download_state(source.peer_id, timeout=30, max_bytes=10 << 20)
        assert header["round"] == 3 and all(torch.equal(a, b) for a, b in zip(tensors, state))
        assert joiner.downloads[path] == 1, joiner.downloads
    with pytest.raises(Exception, match="more than"):  # the size cap holds on the direct path as well
        joiner.download_state(donor.peer_id, timeout=30, max_bytes=1 << 20)
