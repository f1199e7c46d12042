"""A hostile DiLoCo peer for tests/test_diloco_attack.py: it joins through the real ``start_dht``, with a
node that accepts and serves anything, and every second writes the forgeries of issue 10:

- ``victim_subkey``: a DiLoCo trainer's own ``[owner:...]`` subkey, signed with the attacker's key;
- ``victim_peer_id``: the same trainer's plain peer id as subkey (the unsigned format of old);
- ``samples_2_62``: its own signed subkey, 2^62 samples in the current round;
- ``round_1e6``: its own signed subkey, progress at round 10^6, and a ready record for round 10^6;
- ``year_expiration``: its own signed subkey, plausible values, stored for a year;
- ``oversize``: its own signed subkey, a 5 kB value;
- ``far_takeover``: its own signed subkey (not its peer's), the state of issue 10: round 10^6, 2^62 samples;
- ``takeover``: under its peer id's key (so honest peers can download from it), a state record that it
  serves as an all-zero model hashed with ``state_digest``: at round 10^6 with 2^62 samples
  (``far``), or one round ahead of the honest peers with more samples, within every bound (``near``).

Usage: diloco_attacker.py INITIAL_PEER REPORT_JSON far|near
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from harness.processes import write_json
from rogue_peer import Forger, owner_of
from swarm.averaging.service import AveragingService
from swarm.config.loading import load_config
from swarm.config.schema import NetworkConfig
from swarm.net import keys
from swarm.net.dht import start_dht
from swarm.net.diloco_records import Progress, StateRecord, encode_record, parse_record
from swarm.net.identity import load_identity, peer_id_of_owner
from swarm.train.agreement import HASH, state_digest
from swarm.train.model import ByteGPT

DEBUG_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
YEAR = 365 * 86400.0


def honest_view(dht, run_id: str, mine: set[str]) -> tuple[dict[str, bytes], int, int]:
    """Owner tag of every signed trainer record but ``mine``, and the largest round and total they announce."""
    found = dht.get(keys.diloco_peers(run_id), latest=True)
    owners, round_number, total = {}, 0, 0
    for subkey, item in (found.value.items() if found is not None and isinstance(found.value, dict) else []):
        parsed = parse_record(item.value)
        peer = peer_id_of_owner(subkey) if isinstance(subkey, bytes) else None
        if parsed is None or peer is None or peer in mine or parsed[1] is None:
            continue
        owners[peer] = subkey
        round_number, total = max(round_number, parsed[1].round), max(total, parsed[1].total)
    return owners, round_number, total


def forged_records(owners: dict, own: bytes, victims: dict, honest_round: int, state_round: int, state_total: int,
                   digest: str, now: float) -> dict:
    """name -> (subkey, value, seconds to live): every record the attacker tries to store this cycle."""
    far_ahead = encode_record(Progress(10**6, 2**62, now), StateRecord(10**6, 2**62, digest, "institution"))
    records = {
        "samples_2_62": (owners["samples_2_62"], encode_record(Progress(honest_round, 2**62, now), None), 30),
        "round_1e6": (owners["round_1e6"], encode_record(Progress(10**6, 10, now), None), 30),
        "year_expiration": (owners["year_expiration"], encode_record(Progress(honest_round, 10, now), None), YEAR),
        "oversize": (owners["oversize"], encode_record(Progress(honest_round, 10, now),
                                                       StateRecord(0, 0, "a" * 64, "X" * 5000)), 30),
        "far_takeover": (owners["far_takeover"], far_ahead, 30),
        "takeover": (own, encode_record(
            Progress(state_round, 0, now), StateRecord(state_round, state_total, digest, "institution")), 30),
    }
    for peer, owner in victims.items():
        records[f"victim_subkey {peer}"] = (owner, far_ahead, 30)
        records[f"victim_peer_id {peer}"] = (peer, far_ahead, 30)
    return records


def main(initial_peer: str, report_path: str, takeover: str) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = load_config(DEBUG_CONFIG, environ={})
    run_id = config.run_id
    identity = load_identity(None)
    names = ["samples_2_62", "round_1e6", "year_expiration", "oversize", "far_takeover"]
    own_keys = {name: RSAPrivateKey() for name in names}
    owners = {name: owner_of(key) for name, key in own_keys.items()}
    signer = Forger({**{owners[name]: own_keys[name] for name in names}, identity.owner: identity.private_key},
                    identity.private_key)
    network = NetworkConfig(listen_host="127.0.0.1", initial_peers=[initial_peer], rejoin_period=2.0)
    dht = start_dht(network, identity=identity, record_validators=[signer])

    model = ByteGPT(config.model)
    zeros = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters() if p.requires_grad] * 2
    served = {}
    service = AveragingService(dht=dht, run_id=run_id, chunk_timeout=10.0, request_timeout=1.0).start()
    service.state_provider = lambda: served.get("state")

    report = {"attacker": identity.peer_id, "peer_ids": {name: peer_id_of_owner(o) for name, o in owners.items()},
              "cycles": 0, "stores": {}}
    peers_key, ready_key = keys.diloco_peers(run_id), keys.diloco_ready(run_id)
    try:
        while not stop.is_set():
            victims, honest_round, honest_total = honest_view(dht, run_id, {identity.peer_id, *report["peer_ids"].values()})
            if takeover == "far":
                state_round, state_total = 10**6, 2**62
            else:
                state_round, state_total = honest_round + 1, honest_total + 100_000
            digest = state_digest(state_round, state_total, zeros)
            served["state"] = ({"round": state_round, "total": state_total, HASH: digest}, zeros)
            now = get_dht_time()
            records = forged_records(owners, identity.owner, victims, honest_round, state_round, state_total, digest, now)
            for index, (name, (subkey, value, ttl)) in enumerate(records.items()):
                # distinct expirations: hivemind's storage compares (expiration, subkey) and a str subkey
                # tied with a bytes one raises TypeError (in this node, which stores whatever it is given)
                report["stores"][name] = bool(dht.store(peers_key, value, now + ttl + index * 1e-3, subkey=subkey))
            report["stores"]["ready_1e6"] = bool(dht.store(ready_key, 10**6, now + 30, subkey=owners["round_1e6"]))
            report["cycles"] += 1
            report["victims"] = sorted(victims)
            report["served"] = [state_round, state_total, digest]
            write_json(report_path, report)
            stop.wait(1.0)
    finally:
        service.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
