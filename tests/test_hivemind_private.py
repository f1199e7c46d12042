"""swarm's uses of hivemind's private API (swarm/hivemind_private.py) still match hivemind.

Fails when hivemind is upgraded past the version these calls were written against, or when a name
they rely on disappears: then re-read each call in swarm/hivemind_private.py against the new hivemind.
"""

from __future__ import annotations

import functools
import inspect

import hivemind
import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm import hivemind_private

pytestmark = pytest.mark.timeout(30)


def test_hivemind_is_the_version_the_private_calls_were_written_for():
    assert hivemind.__version__ == hivemind_private.HIVEMIND_VERSION


def test_the_private_names_still_exist():
    assert "self._client" in inspect.getsource(P2P), "P2P._client (the daemon client) is gone"
    assert inspect.iscoroutinefunction(DHTProtocol.call_ping)
    for name in ("_apply_optimizer_parameters_", "_load_local_tensors_into_averager_"):
        assert callable(getattr(TrainingStateAverager, name, None)), f"TrainingStateAverager.{name} is gone"
    assert "self._local_public_key" in inspect.getsource(ProgressTracker.__init__)
    for name in ("dht", "training_progress_key", "local_progress", "metadata_expiration"):
        assert f"self.{name}" in inspect.getsource(ProgressTracker), f"ProgressTracker.{name} is gone"
    for name in ("offload_optimizer", "reuse_tensors"):
        assert name in inspect.getsource(TrainingStateAverager.__init__)


def test_an_rsa_key_round_trips_through_der_bytes():
    from cryptography.hazmat.primitives import serialization

    original = RSAPrivateKey()
    der = original._private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    restored = hivemind_private.rsa_private_key_from_der(der)
    assert restored.get_public_key().to_bytes() == original.get_public_key().to_bytes()
    assert original.get_public_key().verify(b"data", restored.sign(b"data"))


def test_static_relays_turn_relay_discovery_off_only_when_relays_are_given():
    hivemind_private.use_static_relays()
    hivemind_private.use_static_relays()  # idempotent: wrapped once
    with_relays = P2P._make_process_args("p2pd", autoRelay=True, trustedRelays="/ip4/1.2.3.4/tcp/1/p2p/x")
    assert "-relayDiscovery=0" in with_relays and with_relays.count("-relayDiscovery=0") == 1
    assert not any("relayDiscovery" in arg for arg in P2P._make_process_args("p2pd", autoRelay=False))
    assert "trustedRelays" in inspect.getsource(P2P.create), "hivemind no longer passes trusted relays to p2pd"


def test_held_value_is_what_a_node_stores_for_others_and_nothing_on_a_client():
    server = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = hivemind.DHT(start=True, client_mode=True, initial_peers=[str(m) for m in server.get_visible_maddrs()])
    try:
        expires = get_dht_time() + 30
        assert server.store("k", [1, 2], expires, subkey="server") and client.store("k", [3], expires, subkey="client")
        held = server.run_coroutine(functools.partial(hivemind_private.held_value, key="k"))
        assert {subkey: item.value for subkey, item in held.value.items()} == {"server": [1, 2], "client": [3]}
        assert held.value["client"].expiration_time == expires
        assert server.run_coroutine(functools.partial(hivemind_private.held_value, key="other")) is None
        assert client.run_coroutine(functools.partial(hivemind_private.held_value, key="k")) is None
    finally:
        client.shutdown()
        server.shutdown()
