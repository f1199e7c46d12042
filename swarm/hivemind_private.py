"""Every use of hivemind's private or undocumented API, in one place.

swarm builds on hivemind's public pieces (DHT, Optimizer, averagers, validators, compression); where
no public way exists, the call goes through here, so an upgrade of hivemind has one file to check.
``tests/test_hivemind_private.py`` fails if hivemind's version or any of these names change.
"""

from __future__ import annotations

from typing import Optional

from hivemind.dht.node import DHTID, _SearchState
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time
from multiaddr import Multiaddr

HIVEMIND_VERSION = "1.1.12"  # the version these calls were written and tested against (pyproject pins it)


async def dial(node, peer: PeerID, address: Multiaddr) -> None:
    """Make the libp2p daemon of a DHT ``node`` connect to ``peer`` at ``address`` (without /p2p/):
    hivemind has no public call that dials a known address again after the DHT forgot it."""
    await node.p2p._client.connect(peer, [address])


async def ping(node, peer: PeerID) -> bool:
    """Whether ``peer`` answers a DHT ping; an answer also puts it back into ``node``'s routing table."""
    return await node.protocol.call_ping(peer) is not None


async def held_value(_dht, node, key: str) -> Optional[ValueWithExpiration]:
    """What ``node`` itself holds for ``key`` as one of the nodes that store it (its storage, not the cache of
    values it looked up), decoded as ``DHT.get`` decodes a found value; None if it holds nothing, or if it is a
    client (its storage holds only what it stored itself: no other node stores there). For ``DHT.run_coroutine``.
    hivemind's ``get`` reads the same storage first, but with ``latest=True`` it goes on to ask every other holder
    (each answers with the whole value), and without it may answer from the cache."""
    if node.protocol.client_mode:
        return None
    key_id = DHTID.generate(source=key)
    search = _SearchState(key_id, float("inf"), serializer=node.protocol.serializer,
                          record_validator=node.protocol.record_validator)
    search.add_candidate(node.protocol.storage.get(key_id), source_node_id=node.node_id)
    search.finish_search()
    return await search.future


def rsa_private_key_from_der(der: bytes) -> RSAPrivateKey:
    """hivemind's RSAPrivateKey from DER bytes: its pickling hook is the only way in from bytes."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key


def push_loaded_state(averager) -> None:
    """After writing parameters and optimizer state into a TrainingStateAverager's optimizer by hand,
    propagate them as its own ``load_state_from_peers`` does (offloaded optimizer, averaged tensors)."""
    if averager.offload_optimizer:
        averager._apply_optimizer_parameters_()
    if not averager.reuse_tensors:
        averager._load_local_tensors_into_averager_()


def publish_progress(tracker) -> None:
    """Store a ProgressTracker's local progress (its epoch) in the DHT now. hivemind's reporter
    publishes only for a peer that accumulated samples in the previous epoch, so a peer that reached
    an epoch by downloading state goes on showing its old epoch until that record expires
    (``metadata_expiration``, 60 s): at the end of a run, the others would wait that long for it."""
    tracker.dht.store(key=tracker.training_progress_key, subkey=tracker._local_public_key,
                      value=tracker.local_progress.dict(), expiration_time=get_dht_time() + tracker.metadata_expiration)


def use_static_relays() -> None:
    """Make p2pd treat ``trusted_relays`` as static relays (``-relayDiscovery=0``) whenever hivemind passes them.

    hivemind starts p2pd with relay discovery on, and then libp2p's autorelay waits for four candidate
    relays or three minutes before it reserves a slot on any: a peer behind NAT would stay unreachable for
    minutes. With static relays it reserves on them at once. hivemind has no argument for the flag, so
    this wraps ``P2P._make_process_args`` (idempotent; DHT processes forked afterwards inherit it).
    """
    if getattr(P2P._make_process_args, "swarm_static_relays", False):
        return
    original = P2P._make_process_args

    def make_process_args(*args, **kwargs):
        if kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return original(*args, **kwargs)

    make_process_args.swarm_static_relays = True
    P2P._make_process_args = staticmethod(make_process_args)
