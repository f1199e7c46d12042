"""An outsider of a private run for tests/test_private_run.py: it knows every multiaddr and the run id,
holds no certificate, and tries what a member does:

- ``dht``: join the run's DHT through the bootstrap peer (and so store or read any record);
- ``state``: download a trainer's whole state (the model) straight from its averaging service;
- ``join``: ask a trainer to take it into its averaging group;
- ``fetch``: ask a trainer for a part of a round;
- ``endpoints``: ask a trainer where its direct links listen (:mod:`swarm.net.direct`);
- ``direct``: connect to a trainer's direct port (``TRAINER_MADDR,HOST:PORT``, read from its log: a
  port is no secret), prove its own fresh identity, and ask for a part of a round there.

Each outcome goes into the report: ``served`` (with bytes), ``answered`` (the service read the request
and answered it with an error: the outsider got through to it) or ``refused`` (with the answer). The
same script against an open run shows what admission stops.

Usage: outsider.py REPORT_JSON RUN_ID BOOTSTRAP_MADDR TRAINER_MADDR[,DIRECT_HOST:PORT]...
"""

from __future__ import annotations

import asyncio
import sys

from hivemind.p2p import P2P, PeerID
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.multiaddr import Multiaddr

from harness.processes import write_json
from swarm.averaging import wire
from swarm.averaging.service import AveragingService
from swarm.config.schema import NetworkConfig
from swarm.errors import NetworkError
from swarm.net.dht import shutdown_dht, start_dht
from swarm.net.direct import connect
from swarm.net.identity import load_identity

TIMEOUT = 20.0


def try_dht(bootstrap: str) -> dict:
    try:
        dht = start_dht(NetworkConfig(listen_host="127.0.0.1", port=0, initial_peers=[bootstrap], bootstrap_timeout=8))
    except NetworkError as e:
        return {"outcome": "refused", "answer": str(e)}
    shutdown_dht(dht)
    return {"outcome": "served", "answer": "joined the DHT"}


async def call(p2p: P2P, peer: PeerID, namespace: str, method: str, request) -> dict:
    stub = AveragingService.get_stub(p2p, peer, namespace=namespace)
    try:
        stream = await asyncio.wait_for(getattr(stub, method)(request), TIMEOUT)
        header, payloads = await wire.read_tensor_messages(aiter_with_timeout(stream, TIMEOUT), max_bytes=2**30)
    except Exception as e:  # the refusal arrives as the stream's error message
        return {"outcome": "refused", "answer": f"{type(e).__name__}: {e}"[:300]}
    return {"outcome": "served", "bytes": sum(len(p.buffer) for p in payloads), "header": sorted(header)}


async def ask_endpoints(p2p: P2P, peer: PeerID, namespace: str) -> dict:
    stub = AveragingService.get_stub(p2p, peer, namespace=namespace)
    try:
        fields = wire.metadata_of(await asyncio.wait_for(stub.rpc_direct_endpoints(wire.request()), TIMEOUT))
    except Exception as e:
        return {"outcome": "refused", "answer": f"{type(e).__name__}: {e}"[:300]}
    if "error" in fields:
        return {"outcome": "refused", "answer": str(fields["error"])[:300]}
    return {"outcome": "served", "endpoints": fields.get("endpoints")}


async def try_direct(endpoint: str, peer: PeerID, namespace: str) -> dict:
    host, port = endpoint.rsplit(":", 1)
    try:
        channel = await connect(host, int(port), expected_peer=peer.to_base58(),
                                private_key=load_identity(None).private_key, namespace=namespace, timeout=TIMEOUT)
        request = wire.request(group=b"x" * 16, phase=0, kind="in", index=0).SerializeToString()
        replies = wire.parse_responses(channel.exchange(request))
        header, payloads = await wire.read_tensor_messages(aiter_with_timeout(replies, TIMEOUT), max_bytes=2**30)
    except wire.ProtocolError as e:  # the trainer's service answered (with an error): the outsider got through
        return {"outcome": "answered", "answer": f"{type(e).__name__}: {e}"[:300]}
    except Exception as e:
        return {"outcome": "refused", "answer": f"{type(e).__name__}: {e}"[:300]}
    return {"outcome": "served", "bytes": sum(len(p.buffer) for p in payloads), "header": sorted(header)}


async def try_services(run_id: str, trainers: list[str]) -> dict:
    direct = dict(trainer.split(",") if "," in trainer else (trainer, None) for trainer in trainers)
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=list(direct))
    namespace = f"{run_id}_swarm_averaging"
    results = {}
    try:
        for maddr, endpoint in direct.items():
            peer = PeerID.from_base58(Multiaddr(maddr).value_for_protocol("p2p"))
            results[str(peer)] = {
                "state": await call(p2p, peer, namespace, "rpc_download_state", wire.request()),
                "join": await call(p2p, peer, namespace, "rpc_join", wire.request(round=1, weight=1.0)),
                "fetch": await call(p2p, peer, namespace, "rpc_fetch",
                                    wire.request(group=b"x" * 16, phase=0, kind="in", index=0)),
                "endpoints": await ask_endpoints(p2p, peer, namespace),
            }
            if endpoint is not None:
                results[str(peer)]["direct"] = await try_direct(endpoint, peer, namespace)
    finally:
        await p2p.shutdown()
    return results


def main() -> None:
    report, run_id, bootstrap, *trainers = sys.argv[1:]
    result = {"dht": try_dht(bootstrap)}
    result["services"] = asyncio.run(try_services(run_id, trainers))
    write_json(report, result)


if __name__ == "__main__":
    main()
