"""What every signed record kind shares: a DHT-side guard that refuses a record on every node, and says why.

A record kind (:mod:`swarm.net.metrics_record`, :mod:`swarm.net.diloco_records`) lives under one or
more fixed DHT keys; each peer writes one subkey, ``[owner:<its RSA public key>]``, and hivemind's
:class:`RSASignatureValidator` signs and checks it, so nobody can write another peer's subkey.
:class:`SignedRecordGuard` runs before that validator on every node that stores or fetches the key and
checks, in order: size, an owner subkey, the signature, an expiration no further ahead than the kind's
time to live (plus :data:`CLOCK_SLACK`), then the kind's own schema and bounds (:meth:`check_value`).
The owner's peer id is derived from its key (:func:`swarm.net.identity.peer_id_of_owner`), so a record
always speaks for the peer that signed it.

Each distinct refused record is counted once in :data:`swarm.net.refusals.REFUSALS` and logged at
WARNING, at most once a minute per (reason, sender).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time, get_logger
from hivemind.utils.crypto import RSAPrivateKey

from swarm.net.identity import peer_id_of_owner
from swarm.net.refusals import refuse

logger = get_logger(__name__)

# a peer's clock may run this far ahead of this node's: expirations and timestamps get this much slack
CLOCK_SLACK = 30.0

Verdict = tuple[Optional[str], str]  # (None, "") for a genuine record, else (reason, detail)


@lru_cache(maxsize=4096)
def owner_tag_peer_id(owner: bytes) -> Optional[str]:
    """:func:`~swarm.net.identity.peer_id_of_owner`, cached: a key is parsed once, not at every read."""
    return peer_id_of_owner(owner)


def owner_peer_id(subkey: bytes) -> Optional[str]:
    """The peer id of the RSA key a serialized ``[owner:...]`` subkey names, or None."""
    try:
        owner = MSGPackSerializer.loads(subkey)
    except Exception:  # msgpack raises several types for garbage; all mean the same here
        return None
    return owner_tag_peer_id(owner) if isinstance(owner, bytes) else None


def peer_of_subkey(subkey) -> Optional[str]:
    """The peer id a DiLoCo record's subkey stands for: the signer's, for an ``[owner:<RSA key>]`` subkey
    (the DHT nodes checked the signature); a plain base58 peer id only where no node checks signatures
    (a DHT started without :func:`swarm.net.validators.run_validators`, as in some tests and benchmarks)."""
    if isinstance(subkey, bytes):
        return owner_tag_peer_id(subkey)
    return subkey if isinstance(subkey, str) and 0 < len(subkey) <= 128 else None


def owner_tag(dht: hivemind.DHT, private_key: Optional[RSAPrivateKey]) -> Optional[bytes]:
    """The ``[owner:...]`` subkey this peer signs its DiLoCo records under: that of ``private_key`` if it
    is the key of this peer's id (so readers map the record to this peer), else None (unsigned)."""
    if private_key is None:
        return None
    owner = RSASignatureValidator(private_key).local_public_key
    return owner if owner_tag_peer_id(owner) == dht.peer_id.to_base58() else None


class SignedRecordGuard(RecordValidatorBase):
    """Refuses records of its keys that are oversized, unsigned, badly signed, expire too far ahead or
    fail :meth:`check_value`. Subclasses name their keys and check their values.

    :param keys: DHT key -> time to live (seconds) of that key's records.
    :param max_bytes: largest stored value, signature included.
    """

    def __init__(self, *, keys: dict[str, float], signatures: RSASignatureValidator, max_bytes: int):
        self._kinds = {DHTID.generate(source=key).to_bytes(): (key, ttl) for key, ttl in keys.items()}
        self._signatures, self.max_bytes = signatures, max_bytes

    @property
    def priority(self) -> int:
        return 20  # validation runs in decreasing priority: before RSASignatureValidator (10)

    def check_value(self, key: str, owner: str, value, record: DHTRecord) -> Verdict:
        """The kind's own schema and bounds, for ``value`` (decoded, signature stripped) written by ``owner``."""
        raise NotImplementedError

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in self._kinds:
            return True
        reason, detail = self.check(record)
        if reason is None:
            return True
        refuse(logger, reason, record.subkey + b"\0" + record.value, owner_peer_id(record.subkey) or "unsigned",
               detail, f"a {self._kinds[record.key][0]} record")
        return False

    def check(self, record: DHTRecord) -> Verdict:
        """(None, "") for a genuine record of one of this guard's keys, else (reason, detail)."""
        if len(record.value) > self.max_bytes:
            return "oversized", f"{len(record.value)} bytes, at most {self.max_bytes} allowed"
        owner = owner_peer_id(record.subkey)
        if owner is None:
            return "unsigned", "the subkey names no [owner:<RSA key>]"
        if not self._signatures.validate(record):
            return "bad_signature", f"signature does not match the owner key of {owner}"
        name, ttl = self._kinds[record.key]
        if record.expiration_time > get_dht_time() + ttl + CLOCK_SLACK:
            ahead = record.expiration_time - get_dht_time()
            return "expiration", f"from {owner}: expires in {ahead:.0f}s, at most {ttl:g}s allowed"
        try:
            value = MSGPackSerializer.loads(self._signatures.strip_value(record))
        except Exception as e:  # msgpack's errors for truncated or garbage bytes
            return "schema", f"from {owner}: undecodable value ({type(e).__name__})"
        return self.check_value(name, owner, value, record)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return type(other) is type(self) and other._kinds == self._kinds


class KeyGuard(RecordValidatorBase):
    """Refuses, under one DHT key, every record :meth:`check` finds fault with; other keys are not its
    business. For kinds whose values carry their own signature (the run authority's manifests and
    certificates), where :class:`SignedRecordGuard`'s owner subkeys do not apply.

    :param key: the DHT key; :param what: how a log line names a refused record of it.
    """

    def __init__(self, key: str, what: str):
        self.key, self.what = key, what
        self._key_id = DHTID.generate(source=key).to_bytes()

    def check(self, record: DHTRecord) -> Verdict:
        raise NotImplementedError

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        reason, detail = self.check(record)
        if reason is None:
            return True
        refuse(logger, reason, record.subkey + b"\0" + record.value, self.what, detail, self.what)
        return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return type(other) is type(self) and other.key == self.key
