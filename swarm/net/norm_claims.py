"""Signed norm claims: what a member says it put into a round, and what a reducer says it returned.

Every signed statement about an all-reduce names where in the run it belongs: ``(round, group id,
phase)``, and here also the group's members in part order (:func:`members_digest`: member ``j``
reduces part ``j``). That last field is what makes the statement usable as evidence about a group:
a peer's signature over the digest is that peer's own word that it was in that group, with exactly
those members. Without it, two made-up identities could sign reports about a "group" that never met.

A :class:`NormClaim` is one of two statements, told apart by ``part``:

- ``part == INPUTS`` (-1): a member's claim of the norms of its inputs to every part, as the reducers
  decode them (one float per part). It comes with each of its inputs (a reducer refuses an input
  without it, or whose claim for its part does not match what arrived) and with its commit.
- ``part == j``: the reducer of part ``j`` says the result it serves has norm ``norms[0]``. It comes
  with the result (a member refuses a result whose statement is missing or does not match its bytes).

Checks on sizes (:func:`place_in_bounds`, :data:`MAX_MEMBERS`) come before any signature.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from hivemind.utils import MSGPackSerializer

from swarm.net.identity import signer_of

NORM_TAG = b"swarm-part-norms-v1"  # domain separation from receipts, clip reports and DHT records
INPUTS = -1  # the ``part`` of a member's claim about its inputs (a reducer's statement names its part)
NORM_TOLERANCE = 1e-3  # relative: a claimed norm and the norm of the bytes agree within this

# Bounds on where in a run a signed statement (a receipt, a clip report, a norm claim) can place itself
MAX_GROUP_ID_BYTES = 64  # group ids are 16 random bytes
MAX_ROUND = 2**53
MAX_PARTS = 1 << 16
MAX_PHASES = 16
MAX_MEMBERS = 64  # members of one group named in evidence
MAX_PEER_ID_CHARS = 64  # base58 of a 34-byte multihash is 46
DIGEST_BYTES = 32  # sha256


def place_in_bounds(round_number: int, group_id: bytes, phase: int, part: int) -> bool:
    """Whether (round, group, phase, part) is within the bounds above: checked before any signature."""
    return (0 <= round_number <= MAX_ROUND and 0 <= phase < MAX_PHASES and 0 <= part < MAX_PARTS
            and 0 < len(group_id) <= MAX_GROUP_ID_BYTES)


def members_digest(members: Sequence[str]) -> bytes:
    """sha256 of the group's member peer ids (base58), in part order."""
    return hashlib.sha256(MSGPackSerializer.dumps([str(member) for member in members])).digest()


def members_in_bounds(members) -> bool:
    return (isinstance(members, (list, tuple)) and 2 <= len(members) <= MAX_MEMBERS
            and all(isinstance(m, str) and 0 < len(m) <= MAX_PEER_ID_CHARS for m in members)
            and len(set(members)) == len(members))


def norms_message(round_number: int, group_id: bytes, phase: int, digest: bytes, part: int, time: float,
                  norms: Sequence[float]) -> bytes:
    return NORM_TAG + MSGPackSerializer.dumps([int(round_number), bytes(group_id), int(phase), bytes(digest),
                                               int(part), float(time), [float(x) for x in norms]])


def close_norms(claimed: float, actual: float) -> bool:
    """Whether a claimed norm is that of the bytes (the same float32 decode may sum in another order)."""
    return abs(claimed - actual) <= NORM_TOLERANCE * max(claimed, actual) + 1e-12


@dataclass(frozen=True)
class NormClaim:
    """A member's signed input norms (``part == INPUTS``) or a reducer's signed result norm (``part``)."""

    key: bytes  # the signer's OpenSSH RSA public key
    round: int
    group_id: bytes
    phase: int
    members: bytes  # members_digest of the group
    part: int
    time: float
    norms: tuple[float, ...]
    signature: bytes

    @classmethod
    def sign(cls, private_key, round_number: int, group_id: bytes, phase: int, members: Sequence[str], part: int,
             time: float, norms: Sequence[float]) -> "NormClaim":
        digest, norms = members_digest(members), tuple(float(x) for x in norms)
        signature = private_key.sign(norms_message(round_number, group_id, phase, digest, part, time, norms))
        return cls(private_key.get_public_key().to_bytes(), int(round_number), bytes(group_id), int(phase), digest,
                   int(part), float(time), norms, signature)

    def in_bounds(self) -> bool:
        inputs = self.part == INPUTS
        return (place_in_bounds(self.round, self.group_id, self.phase, 0 if inputs else self.part)
                and len(self.members) == DIGEST_BYTES and 0 < len(self.norms) <= (MAX_MEMBERS if inputs else 1)
                and all(math.isfinite(x) and x >= 0 for x in self.norms))

    def signer(self) -> Optional[str]:
        """The signer's peer id if the claim is in bounds and its signature verifies, else None."""
        if not self.in_bounds():
            return None
        return signer_of(self.key, norms_message(self.round, self.group_id, self.phase, self.members, self.part,
                                                 self.time, self.norms), self.signature)

    def about(self, round_number: int, group_id: bytes, phase: int, members: Sequence[str], part: int) -> bool:
        """Whether this claim is about that part of that round, group (with those members) and phase."""
        return (self.round == round_number and self.group_id == bytes(group_id) and self.phase == phase
                and self.part == part and self.members == members_digest(members)
                and (part != INPUTS or len(self.norms) == len(members)))

    def to_wire(self) -> list:
        return [self.key, self.round, self.group_id, self.phase, self.members, self.part, self.time,
                list(self.norms), self.signature]

    @classmethod
    def from_wire(cls, item) -> Optional["NormClaim"]:
        """The claim in a decoded message (untrusted), or None if its shape or types are wrong (not yet verified)."""
        try:
            key, round_number, group_id, phase, members, part, time, norms, signature = item
        except (TypeError, ValueError):
            return None
        if not (isinstance(key, bytes) and isinstance(group_id, bytes) and isinstance(members, bytes)
                and isinstance(signature, bytes) and type(round_number) is int and type(phase) is int
                and type(part) is int and type(time) in (int, float) and isinstance(norms, list)
                and len(norms) <= MAX_MEMBERS and all(type(x) in (int, float) for x in norms)):
            return None
        return cls(key, round_number, group_id, phase, members, part, float(time), tuple(float(x) for x in norms),
                   signature)

    def checked(self, signer: str, round_number: int, group_id: bytes, phase: int, members: Sequence[str],
                part: int) -> bool:
        """Whether ``signer`` signed this claim about that part of that round, group and phase."""
        return self.about(round_number, group_id, phase, members, part) and self.signer() == signer


def claim_from_header(value, signer: str, round_number: int, group_id: bytes, phase: int, members: Sequence[str],
                      part: int) -> Optional[NormClaim]:
    """The claim in a message header (untrusted) if ``signer`` signed it about that part, else None."""
    claim = NormClaim.from_wire(value)
    return claim if claim is not None and claim.checked(signer, round_number, group_id, phase, members, part) else None
