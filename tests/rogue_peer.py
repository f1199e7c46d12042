"""A rogue DHT peer for tests/test_monitor_rogue.py: a modified client that lies in the metrics key.

It joins the swarm as a DHT server whose only validator accepts and serves anything, and keeps
writing (every 2 s) these records under ``{run_id}_metrics``:

- ``overwrite``: the victim's own subkey with forged numbers, signed with the rogue's key;
- ``impersonation``: the rogue's own subkey, correctly signed, claiming the victim's peer id;
- ``malformed``: correctly signed, but ``samples_per_second`` is a string and fields are missing;
- ``oversized``: correctly signed, with a 10 kB display name;
- ``implausible``: a consistent identity of its own claiming 5e7 samples/s;
- ``control``: a consistent identity of its own with plausible numbers (a signature proves who wrote
  a record, not that the work happened: this one is expected to show up as a peer).

Meanwhile it floods the victim's averaging service (a DiLoCo trainer's) with ``FLOOD`` fetches at once
for a part of a group it is not in, again whenever the previous flood is answered: what a modified
client can ask. The victim refuses them all: the first ``MAX_OPEN_FETCHES_PER_PEER`` as not a member
(after waiting for the group to appear), the rest at once as too many open requests. The answers
are counted in the report under ``requests``.

Usage: rogue_peer.py INITIAL_PEER RUN_ID VICTIM_PEER_ID REPORT_JSON
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from harness.processes import write_json
from swarm.averaging.service import MAX_OPEN_FETCHES_PER_PEER, AveragingService
from swarm.net.identity import peer_id_of_owner
from swarm.net.keys import metrics_key

FORGED_NAME = "FORGED"
FLOOD = MAX_OPEN_FETCHES_PER_PEER + 4


class Forger(RecordValidatorBase):
    """Accepts every record; signs each with the key of its owner if the rogue has it, else with its own."""

    def __init__(self, keys: dict[bytes, RSAPrivateKey], fallback: RSAPrivateKey):
        self.keys, self.fallback = keys, fallback

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        owner = next((owner for owner in self.keys if owner in record.subkey), None)
        key = self.keys[owner] if owner is not None else self.fallback
        signature = key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
        return record.value + RSASignatureValidator.SIGNATURE_FORMAT.replace(b"_value_", signature)

    def strip_value(self, record: DHTRecord) -> bytes:
        return RSASignatureValidator._SIGNATURE_RE.sub(b"", record.value)


def owner_of(key: RSAPrivateKey) -> bytes:
    return RSASignatureValidator(key).local_public_key


def genuine_looking(peer_id: str, name: str, **changes) -> dict:
    record = dict(peer_id=peer_id, role="volunteer", state="running", display_name=name, organization="rogue",
                  device="cpu", epoch=0, samples_total=64, samples_per_second=20.0, loss=5.0, heldout_loss=5.0,
                  bytes_sent=None, bytes_received=None, rounds_ok=0, rounds_failed=0, refused={}, refused_requests={},
                  reachability="direct", uptime=10.0, version="0.1.0", time=float(get_dht_time()))
    record.update(changes)
    return record


async def flood(service: AveragingService, victim: PeerID) -> list[str]:
    """``FLOOD`` fetches at once of a part of a group the rogue is not in; each answer's error text."""
    key = (b"not-the-rogues-group", 0, "in", 0)
    fetches = [service._fetch(victim, key, 1 << 20) for _ in range(FLOOD)]  # what a modified client can call
    answers = await asyncio.gather(*fetches, return_exceptions=True)
    return [str(answer) if isinstance(answer, Exception) else "served" for answer in answers]


def main(initial_peer: str, run_id: str, victim: str, report_path: str) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    own, names = RSAPrivateKey(), ["impersonation", "malformed", "oversized", "implausible", "control"]
    keys = {name: RSAPrivateKey() for name in names}
    keys["impersonation"] = own
    owners = {name: owner_of(key) for name, key in keys.items()}
    dht = hivemind.DHT(initial_peers=[initial_peer], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       record_validators=[Forger({owners[name]: keys[name] for name in names}, own)])
    # the victim waits up to its chunk_timeout (10 s) for the group before it refuses a non-member
    service = AveragingService(dht=dht, run_id=run_id, chunk_timeout=30.0, request_timeout=1.0).start()
    key = metrics_key(run_id)
    report: dict = {"stores": {}, "victim_owner_found": False, "requests": {}}
    answers: Counter = Counter()
    flooding: Future | None = None
    try:
        deadline = time.monotonic() + 60
        victim_owner = None
        while victim_owner is None and time.monotonic() < deadline and not stop.is_set():
            found = dht.get(key, latest=True)
            entries = found.value if found is not None and isinstance(found.value, dict) else {}
            victim_owner = next((owner for owner, item in entries.items()
                                 if isinstance(item.value, dict) and item.value.get("peer_id") == victim), None)
            stop.wait(0.5)
        if victim_owner is None:
            raise SystemExit("the victim's record never showed up")
        report["victim_owner_found"] = True
        while not stop.is_set():
            if flooding is None or flooding.done():
                if flooding is not None:
                    answers.update(flooding.result())
                flooding = asyncio.run_coroutine_threadsafe(flood(service, PeerID.from_base58(victim)), service._loop)
            report["requests"] = dict(answers)
            records = {
                "overwrite": (victim_owner, genuine_looking(victim, FORGED_NAME, samples_per_second=999.0, loss=0.01)),
                "impersonation": (owners["impersonation"], genuine_looking(victim, FORGED_NAME)),
                "malformed": (owners["malformed"], {"peer_id": peer_id_of_owner(owners["malformed"]),
                                                    "samples_per_second": "fast"}),
                "oversized": (owners["oversized"], genuine_looking(peer_id_of_owner(owners["oversized"]), "X" * 10_000)),
                "implausible": (owners["implausible"], genuine_looking(peer_id_of_owner(owners["implausible"]),
                                                                       "implausible", samples_per_second=5e7)),
                "control": (owners["control"], genuine_looking(peer_id_of_owner(owners["control"]), "rogue-control")),
            }
            for name, (subkey, value) in records.items():
                stored = dht.store(key, subkey=subkey, value=value, expiration_time=get_dht_time() + 30)
                report["stores"][name] = bool(stored)
            report["peer_ids"] = {name: peer_id_of_owner(owner) for name, owner in owners.items()}
            write_json(report_path, report)
            stop.wait(2.0)
    finally:
        service.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
