"""Equivocation evidence, and the exclusion record that carries it (``keys.exclusions``) with outlier evidence.

A reducer signs, with its identity key, a *receipt* for the result it serves for its part of a
round: ``(round, group id, phase, part, time, digest of the result's bytes)``
(:func:`receipt_message`). Two valid receipts by one reducer for the same ``(round, group, phase,
part)`` over different digests are :class:`Evidence` of equivocation: it gave different members
different results. Anyone can check it alone (:meth:`Evidence.verify`): the reducer's public key
gives its peer id (:func:`swarm.net.identity.peer_id_of_public_key`), and both signatures are its own;
no one's word is needed, so one record of it is enough to exclude the reducer.

The record also carries :class:`~swarm.net.outlier_evidence.OutlierEvidence` (reducers' signed reports
that they clipped a member, round after round), checked the same way.

Each peer that holds evidence publishes it under ``{run_id}_exclusions``, in its own signed subkey
(``[owner:<its RSA key>]``), as a list of at most :data:`MAX_EVIDENCE` items. Every DHT node checks
the record (:class:`ExclusionRecordGuard`: size, signature, expiration, every item verified) and
every reader verifies each item again (:func:`read_evidence`), so a forged item excludes no one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Union

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time, get_logger

from swarm.net import keys
from swarm.net.bound_evidence import WIRE_TAG as BOUND_TAG
from swarm.net.bound_evidence import BoundEvidence
from swarm.net.identity import public_key_of, signer_of
from swarm.net.norm_claims import place_in_bounds
from swarm.net.outlier_evidence import WIRE_TAG as OUTLIER_TAG
from swarm.net.outlier_evidence import OutlierEvidence
from swarm.net.signed_record import SignedRecordGuard, Verdict, peer_of_subkey

logger = get_logger(__name__)

RECEIPT_TAG = b"swarm-reduced-part-v1"  # domain separation: a receipt's signature signs nothing else
DIGEST_BYTES = 32  # sha256
MAX_EVIDENCE = 8  # items in one peer's record: the latest offences it saw
# an equivocation item is about 1.2 kB (a key, two signatures, two digests), a bound item 2.7 kB in a group
# of 4, an outlier item about 2.5 kB per round it spans (members, the accused's claim, two reports); a
# peer publishes its newest items that fit (publish_evidence), and the record, signed, stays under this
MAX_RECORD_BYTES = 65_536
VALUE_BUDGET = MAX_RECORD_BYTES - 4096  # what this peer's items may take, leaving room for the signature


def receipt_message(round_number: int, group_id: bytes, phase: int, part: int, time: float, digest: bytes) -> bytes:
    """What a reducer signs for the result it serves for ``part``."""
    return RECEIPT_TAG + MSGPackSerializer.dumps([int(round_number), bytes(group_id), int(phase), int(part),
                                                  float(time), bytes(digest)])


@dataclass(frozen=True)
class Evidence:
    """Two receipts by one reducer for one part of one round, over different results."""

    key: bytes  # the reducer's OpenSSH RSA public key
    round: int
    group_id: bytes
    phase: int
    part: int
    first: tuple[float, bytes, bytes]  # (time, digest, signature)
    second: tuple[float, bytes, bytes]

    @property
    def accused(self) -> Optional[str]:
        parsed = public_key_of(self.key)
        return parsed[0] if parsed is not None else None

    @property
    def offence(self) -> tuple:
        """What one offence is: (round, group) — several parts or phases of one round count once."""
        return self.round, self.group_id

    @property
    def time(self) -> float:
        """When it happened, as the offender itself signed it (the later of its two receipts)."""
        return max(self.first[0], self.second[0])

    def verify(self) -> Optional[str]:
        """None if this is proof of equivocation, else why not. Checks sizes before any decoding."""
        if not place_in_bounds(self.round, self.group_id, self.phase, self.part):
            return "out of bounds"
        d1, d2 = self.first[1], self.second[1]
        if len(d1) != DIGEST_BYTES or len(d2) != DIGEST_BYTES:
            return "malformed digest"
        if d1 == d2:
            return "equal digests: no equivocation"
        signers = {signer_of(self.key, receipt_message(self.round, self.group_id, self.phase, self.part, t, d), s)
                   for t, d, s in (self.first, self.second)}
        if None in signers or len(signers) != 1:
            return "a signature does not verify"
        return None

    def to_wire(self) -> list:
        return [self.key, self.round, self.group_id, self.phase, self.part, list(self.first), list(self.second)]

    @classmethod
    def from_wire(cls, item) -> Optional["Evidence"]:
        """The evidence in a decoded record item, or None if its shape or types are wrong (not yet verified)."""
        try:
            key, round_number, group_id, phase, part, first, second = item
            receipts = []
            for receipt in (first, second):
                time, digest, signature = receipt
                if type(time) not in (int, float) or not isinstance(digest, bytes) or not isinstance(signature, bytes):
                    return None
                receipts.append((float(time), digest, signature))
            if not (isinstance(key, bytes) and isinstance(group_id, bytes) and type(round_number) is int
                    and type(phase) is int and type(part) is int):
                return None
        except (TypeError, ValueError):
            return None
        return cls(key, round_number, group_id, phase, part, receipts[0], receipts[1])

    def digest(self) -> bytes:
        """Identifies this item (two records holding the same proof count it once)."""
        return hashlib.sha256(MSGPackSerializer.dumps(self.to_wire())).digest()

    def describe(self) -> str:
        """The offence, for a log line."""
        return f"reducer {self.accused} equivocated in round {self.round} (part {self.part})"


def exclusion_seconds(offences: int, base: float, cap: float) -> float:
    """How long the ``offences``-th offence excludes for: ``base x 2^(offences-1)``, at most ``cap``."""
    if offences <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(offences - 1, 64))


Item = Union[Evidence, OutlierEvidence, BoundEvidence]
REASONS = {Evidence: "equivocation", OutlierEvidence: "outlier", BoundEvidence: "oversized result"}


def excluded_peers(items: list[Item], *, base: float, cap: float, now: float,
                   outlier_rounds: Optional[int] = None) -> dict[str, dict]:
    """peer id -> {"until": DHT time, "offences": n, "reason": ...} for each peer that ``items`` (verified evidence)
    exclude at ``now``, with the ``reason`` (:data:`REASONS`, joined by "and"). An equivocation offence is one (round, group), however many parts or proofs show
    it; an outlier offence is ``outlier_rounds`` proven rounds (None: outlier evidence excludes no one),
    and items over overlapping spans of rounds count once. The n-th offence excludes for
    :func:`exclusion_seconds` from the later time the offender's accusers signed (clamped to ``now``:
    a signature dated ahead cannot lengthen the exclusion)."""
    offences: dict[str, dict[tuple, float]] = {}
    outliers: dict[str, list[OutlierEvidence]] = {}
    reasons: dict[str, set[str]] = {}
    for item in items:
        accused = item.accused
        if accused is None:
            continue
        if isinstance(item, OutlierEvidence):
            if outlier_rounds is not None and len(item.rounds) >= outlier_rounds:
                outliers.setdefault(accused, []).append(item)
            continue
        reasons.setdefault(accused, set()).add(REASONS[type(item)])
        times = offences.setdefault(accused, {})
        times[item.offence] = max(times.get(item.offence, 0.0), min(item.time, now))
    for accused, found in outliers.items():
        last = -1
        for item in sorted(found, key=lambda item: item.rounds[-1]):
            if item.rounds[0] > last:  # disjoint from the offence counted before
                offences.setdefault(accused, {})[item.offence] = min(item.time, now)
                reasons.setdefault(accused, set()).add(REASONS[OutlierEvidence])
                last = item.rounds[-1]
    result = {}
    for peer, times in offences.items():
        until = max(times.values()) + exclusion_seconds(len(times), base, cap)
        if until > now:
            result[peer] = {"until": until, "offences": len(times), "reason": " and ".join(sorted(reasons[peer]))}
    return result


def item_from_wire(item) -> Optional[Item]:
    """An item of either kind from its decoded form, or None if its shape or types are wrong (not yet verified)."""
    if isinstance(item, list) and item and isinstance(item[0], str):  # outlier and bound items start with their tag
        return {OUTLIER_TAG: OutlierEvidence.from_wire, BOUND_TAG: BoundEvidence.from_wire}.get(
            item[0], lambda _: None)(item)
    return Evidence.from_wire(item)


def decode_items(value) -> Optional[list[Item]]:
    """A record's items, each verified; None if the record is malformed or any item fails."""
    if not isinstance(value, list) or len(value) > MAX_EVIDENCE:
        return None
    items = [item_from_wire(item) for item in value]
    if any(item is None or item.verify() is not None for item in items):
        return None
    return items


class ExclusionRecordGuard(SignedRecordGuard):
    """Refuses, on every DHT node, an exclusion record that is oversized, unsigned, badly signed, lives
    longer than ``ttl`` or holds anything but verified evidence (at most :data:`MAX_EVIDENCE` items)."""

    def __init__(self, run_id: str, signatures: RSASignatureValidator, ttl: float = keys.EXCLUSION_TTL):
        super().__init__(keys={keys.exclusions(run_id): ttl}, signatures=signatures, max_bytes=MAX_RECORD_BYTES)

    def check_value(self, key: str, owner: str, value, record: DHTRecord) -> Verdict:
        if decode_items(value) is None:
            return "forged", f"from {owner}: not {MAX_EVIDENCE} or fewer items of verified evidence"
        return None, ""


def publish_evidence(dht: hivemind.DHT, run_id: str, owner: Optional[bytes], items: list[Item],
                     ttl: float = keys.EXCLUSION_TTL):
    """Store this peer's latest evidence (the last :data:`MAX_EVIDENCE` items, fewer if they would not fit
    in :data:`VALUE_BUDGET`) under its own subkey; returns the store's future (a caller on an event loop
    must not wait on the DHT)."""
    value = [item.to_wire() for item in items[-MAX_EVIDENCE:]]
    while len(value) > 1 and len(MSGPackSerializer.dumps(value)) > VALUE_BUDGET:
        value.pop(0)
    return dht.store(keys.exclusions(run_id), value, get_dht_time() + ttl, subkey=owner or dht.peer_id.to_base58(),
                     return_future=True)


def read_evidence(dht: hivemind.DHT, run_id: str, timeout: Optional[float] = None) -> list[Item]:
    """Every item of every peer's exclusion record, each verified here again (a node that does not run
    the guard may hand over anything); malformed records and items are skipped."""
    found = dht.get(keys.exclusions(run_id), latest=True, return_future=True).result(timeout)
    evidence = []
    if found is None or not isinstance(found.value, dict):
        return evidence
    for subkey, item in found.value.items():
        if peer_of_subkey(subkey) is None:
            continue
        raw = getattr(item, "value", None)
        for entry in raw if isinstance(raw, list) else []:
            parsed = item_from_wire(entry)
            if parsed is not None and parsed.verify() is None:
                evidence.append(parsed)
    return evidence
