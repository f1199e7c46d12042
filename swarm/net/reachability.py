"""Whether the swarm can reach this peer, and how a peer behind NAT becomes reachable through a relay.

**Dial-back.** Every peer that accepts connections serves ``swarm.dial_back``: a caller names the TCP
ports it listens on, and the server tries a plain TCP connection to each of them *at the address the
caller's connection comes from* (as libp2p's AutoNAT does). A peer at home behind a router without a
forwarded port gets "unreachable": the router drops the connection. The server connects nowhere
else (not to addresses the caller claims), to at most :data:`MAX_PORTS` ports, one request per caller
at a time, a few in all, so the service cannot be used to make a public peer scan or flood others.

**Relay.** A peer that is not reachable keeps a reservation on the initial peers (libp2p circuit
relay v2: every swarm peer with hivemind's default ``use_relay`` serves as a relay) and announces
``<initial peer>/p2p-circuit`` addresses, so that others open their connections to it through the
relay. Its DHT, averaging and state transfers then work unchanged: they address peers by id.
``network.use_auto_relay`` forces this (``true``) or forbids it (``false``); ``null`` (the default)
lets :func:`swarm.net.dht.start_dht` decide with a dial-back.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Optional, Sequence

import hivemind
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_logger
from hivemind.utils.serializer import MSGPackSerializer
from multiaddr import Multiaddr
from multiaddr.exceptions import ProtocolLookupError

logger = get_logger(__name__)

DIAL_BACK = "swarm.dial_back"
MAX_PORTS = 4  # a peer listens on one or two ports; more is a hostile request
MAX_REQUEST_BYTES = 256
DIAL_TIMEOUT = 3.0  # seconds for one TCP connection back to the caller
ASK_TIMEOUT = 15.0  # seconds the caller waits for a verdict
MAX_CONCURRENT_DIALS = 4


def relay_options(initial_peers: Sequence[str]) -> dict:
    """hivemind.DHT / P2P arguments that make a peer behind NAT reachable through ``initial_peers``."""
    return dict(
        use_auto_relay=True,
        force_reachability="private",  # do not wait for AutoNAT, which cannot judge private addresses
        trusted_relays=list(initial_peers),
        # libp2p's autorelay advertises circuit addresses only through relays with public IPs; announcing them
        # explicitly works on a LAN or in a lab too, and the relay is the one this peer holds a reservation on
        announce_maddrs=[f"{maddr}/p2p-circuit" for maddr in initial_peers],
    )


def listening_ports(dht: hivemind.DHT) -> list[int]:
    """TCP ports this peer announces for direct connections (not circuit addresses)."""
    ports = set()
    for maddr in dht.get_visible_maddrs(latest=True):
        if "p2p-circuit" in str(maddr):
            continue
        try:
            ports.add(int(Multiaddr(str(maddr)).value_for_protocol("tcp")))
        except ProtocolLookupError:  # an address without a TCP port is not a candidate
            continue
    return sorted(ports)[:MAX_PORTS]


def serve_dial_back(dht: hivemind.DHT) -> None:
    """Register the dial-back handler in the DHT's process (every peer that accepts connections does)."""
    dht.run_coroutine(_register)


async def _register(_dht, node) -> None:
    busy: set[PeerID] = set()
    limit = asyncio.Semaphore(MAX_CONCURRENT_DIALS)

    async def handle(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        caller = context.remote_id
        if len(request.metadata) > MAX_REQUEST_BYTES or caller in busy:
            return _answer(error="refused")
        try:
            ports = MSGPackSerializer.loads(request.metadata).get("ports")
        except Exception:  # noqa: BLE001 - hostile or broken input gets a refusal, not a traceback
            return _answer(error="malformed")
        if not isinstance(ports, list) or not 0 < len(ports) <= MAX_PORTS or \
                not all(isinstance(port, int) and 0 < port < 65536 for port in ports):
            return _answer(error="malformed")
        busy.add(caller)
        try:
            hosts = await _observed_hosts(node, caller)
            async with limit:
                results = await asyncio.gather(*(_connects(host, port) for host in hosts for port in ports))
            return _answer(reachable=any(results), hosts=len(hosts))
        finally:
            busy.discard(caller)

    await node.p2p.add_protobuf_handler(DIAL_BACK, handle, runtime_pb2.ExpertRequest)


async def _observed_hosts(node, caller: PeerID) -> list[str]:
    """The IPs of this peer's direct connections with ``caller`` (relayed ones have none)."""
    hosts = []
    for info in await node.p2p.list_peers():
        if info.peer_id != caller:
            continue
        for addr in info.addrs:  # hivemind's own copy of multiaddr: parse again with the one swarm uses
            if "p2p-circuit" in str(addr):
                continue
            for family in ("ip4", "ip6"):
                try:
                    hosts.append(Multiaddr(str(addr)).value_for_protocol(family))
                except ProtocolLookupError:  # not this family
                    pass
    return sorted(set(hosts))[:2]


async def _connects(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _answer(**fields) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(fields))


def reachable(dht: hivemind.DHT, initial_peers: Sequence[str]) -> Optional[bool]:
    """Ask the initial peers, one after another, to dial this peer back. True or False: the first
    verdict; None: no initial peer gave one (older peers, or none answered), so nothing is known."""
    ports = listening_ports(dht)
    if not ports:
        return None
    for maddr in initial_peers:
        peer = Multiaddr(maddr).value_for_protocol("p2p")
        if peer == str(dht.peer_id):
            continue
        try:
            verdict = dht.run_coroutine(partial(_ask, peer=peer, ports=ports), return_future=True).result(ASK_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - this initial peer gave no verdict; ask the next one
            logger.info(f"dial-back by {peer[-6:]} gave no verdict: {e!r}")
            continue
        if verdict is not None:
            return verdict
    return None


async def _ask(_dht, node, peer: str, ports: list[int]) -> Optional[bool]:
    response = await node.p2p.call_protobuf_handler(
        PeerID.from_base58(peer), DIAL_BACK, runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps({"ports": ports})),
        runtime_pb2.ExpertResponse)
    if len(response.metadata) > MAX_REQUEST_BYTES:
        return None
    answer = MSGPackSerializer.loads(response.metadata)
    if not isinstance(answer, dict) or "reachable" not in answer or not answer.get("hosts"):
        return None
    return bool(answer["reachable"])
