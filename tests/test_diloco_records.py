"""DiLoCo records without a network: what every DHT node refuses (swarm.net.diloco_records), judged by
hivemind's composite of the run's validators, as a node runs them. The attack with real processes is
in test_diloco_attack.py."""

from __future__ import annotations

import dataclasses

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm.net import keys
from swarm.net.diloco_records import MAX_RECORD_BYTES, Progress, RecordBounds, StateRecord, encode_record, parse_record
from swarm.net.identity import load_identity
from swarm.net.validators import run_validators

pytestmark = pytest.mark.timeout(60)

RUN = "unit-run"
BOUNDS = RecordBounds.for_run(max_epochs=30, round_timeout=600.0, max_samples_per_second=100_000.0)


def signed(key: str, value, *, owner_key, signing_key=None, expires_in: float = 30.0) -> DHTRecord:
    """The record a DHT node receives: msgpack'd owner subkey and value, signed as hivemind signs."""
    owner = RSASignatureValidator(owner_key).local_public_key
    unsigned = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(owner),
                         MSGPackSerializer.dumps(value), get_dht_time() + expires_in)
    signature = (signing_key or owner_key).sign(MSGPackSerializer.dumps(dataclasses.astuple(unsigned)))
    return dataclasses.replace(unsigned, value=unsigned.value + b"[signature:" + signature + b"]")


def progress_record(round_number=3, samples=160, total=480, role="volunteer", hash_="ab" * 32):
    return encode_record(Progress(round_number, samples, get_dht_time()), StateRecord(round_number, total, hash_, role))


@pytest.fixture(scope="module")
def ids():
    return [load_identity(None) for _ in range(2)]


def verdict(record: DHTRecord, node_key) -> tuple[bool, str | None]:
    """What a swarm DHT node decides (hivemind's composite of the run's validators) and the guard's reason."""
    validators = run_validators(RUN, node_key, BOUNDS)
    return CompositeValidator(validators).validate(record), validators[-1].check(record)[0]


def test_genuine_records_are_accepted(ids):
    victim, node = ids
    peers, ready = keys.diloco_peers(RUN), keys.diloco_ready(RUN)
    assert verdict(signed(peers, progress_record(), owner_key=victim.private_key), node.private_key) == (True, None)
    assert verdict(signed(peers, [[], [30, 30, "h", "institution"]], owner_key=victim.private_key),
                   node.private_key) == (True, None)  # a sync-mode peer settling the end of a run
    assert verdict(signed(ready, 7, owner_key=victim.private_key), node.private_key) == (True, None)


def test_every_forgery_of_issue_10_is_refused(ids):
    victim, rogue = ids
    peers, ready = keys.diloco_peers(RUN), keys.diloco_ready(RUN)
    cases = {
        "bad_signature": signed(peers, progress_record(), owner_key=victim.private_key, signing_key=rogue.private_key),
        "implausible": signed(peers, progress_record(samples=2**62), owner_key=rogue.private_key),
        "expiration": signed(peers, progress_record(), owner_key=rogue.private_key, expires_in=365 * 86400),
        "oversized": signed(peers, progress_record(role="X" * MAX_RECORD_BYTES), owner_key=rogue.private_key),
        "schema": signed(peers, progress_record(role="admin"), owner_key=rogue.private_key),
    }
    for reason, record in cases.items():
        assert verdict(record, victim.private_key) == (False, reason), reason
    for record in (progress_record(round_number=10**6), progress_record(total=2**62),
                   encode_record(None, StateRecord(10**6, 2**62, "00" * 32, "volunteer"))):
        assert verdict(signed(peers, record, owner_key=rogue.private_key), victim.private_key) == (False, "implausible")
    future = encode_record(Progress(3, 10, get_dht_time() + 3600), None)  # keeps a fake peer "alive"
    assert not verdict(signed(peers, future, owner_key=rogue.private_key), victim.private_key)[0]
    assert verdict(signed(ready, 10**6, owner_key=rogue.private_key), victim.private_key) == (False, "implausible")
    assert verdict(signed(ready, 3, owner_key=rogue.private_key, expires_in=86400), victim.private_key) == (
        False, "expiration")
    genuine = signed(peers, progress_record(), owner_key=victim.private_key)
    plain_id = dataclasses.replace(genuine, subkey=MSGPackSerializer.dumps(victim.peer_id))  # the old format
    assert verdict(plain_id, rogue.private_key) == (False, "unsigned")


def test_readers_apply_the_same_bounds():
    assert parse_record(progress_record(), BOUNDS) is not None
    assert parse_record(progress_record(samples=2**62), BOUNDS) is None
    assert parse_record(progress_record(round_number=10**6), BOUNDS) is None
    assert parse_record([[], []], BOUNDS) == (None, None)
    assert BOUNDS.max_round == 31 and BOUNDS.max_round_samples == 120_000_000


def test_record_sizes():
    """A signed record stays well under the cap (RSA-2048: a 256-byte signature)."""
    node = load_identity(None)
    record = signed(keys.diloco_peers(RUN), progress_record(round_number=123_456, samples=10**6, total=10**12),
                    owner_key=node.private_key)
    assert len(record.value) < MAX_RECORD_BYTES // 2
