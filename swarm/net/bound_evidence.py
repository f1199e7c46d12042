"""Bound evidence: a reducer's signed result far larger than what its members signed they put in.

Under robust aggregation (CenteredClip, :mod:`swarm.averaging.robust`) an honest reducer's result is a
convex combination of points near the members' inputs: its norm stays within a small multiple of
theirs (the start, a coordinate-wise median, lies in the honest inputs' range; each step moves towards
inputs, a far one held at the radius). A reducer returning garbage (noise, or its own update blown up)
has no such bound. Its signed statement of the result's norm (:class:`~swarm.net.norm_claims.NormClaim`
with its part, which members check against the bytes they received) next to the members' signed claims
of their inputs' norms is proof anyone can check alone:

- the statement is the reducer's own signature (its peer id is ``members[part]``); each claim is a
  member's own signature over the same round, group and member list;
- it holds the claims of every other member of a group of at least 3, and the result's norm exceeds
  :data:`RATIO` times the largest of them for its part. Every other member, not a majority: honest
  inputs can be tiny (a member with no samples this round sends zeros), and with a majority of tiny
  claims an honest reducer whose own input is large would be framed; with all of them, its own input
  is the lone outlier that CenteredClip clips (in a group of 2 nothing is clipped: no evidence there).
  The price: one hostile member's inflated claim shields a garbage reducer (two colluders of a group).

What it does not catch: a wrong result within that bound (a bias, or noise at up to RATIO x the inputs'
norm, in 1/n of the update): spot re-computation would (docs/robust-averaging.md). Readers apply it
only under robust aggregation (the ban policy lives there): with the plain mean one member's x1000
input makes an honest reducer's result that large.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

from hivemind.utils import MSGPackSerializer

from swarm.net.norm_claims import INPUTS, NormClaim, members_in_bounds

WIRE_TAG = "bound"
RATIO = 8.0  # an honest CenteredClip result is within about 3x its largest honest input (see module doc)


@dataclass(frozen=True)
class BoundEvidence:
    """A reducer's result statement and every other member's input claim, out of bounds."""

    members: tuple[str, ...]  # the group, in part order
    result: NormClaim  # the reducer's statement of its result's norm (result.part is its part)
    claims: tuple[NormClaim, ...]  # other members' input claims

    @property
    def accused(self) -> Optional[str]:
        part = self.result.part
        return self.members[part] if 0 <= part < len(self.members) else None

    @property
    def round(self) -> int:
        return self.result.round

    @property
    def part(self) -> int:
        return self.result.part

    @property
    def offence(self) -> tuple:
        """One offence per (round, group), as for equivocation: both in one round count once."""
        return self.result.round, self.result.group_id

    @property
    def time(self) -> float:
        return self.result.time

    def verify(self) -> Optional[str]:
        """None if this proves an out-of-bounds result, else why not. Sizes come before any signature."""
        if not members_in_bounds(self.members):
            return "malformed members"
        n, result = len(self.members), self.result
        if not 0 <= result.part < n or not result.in_bounds():
            return "out of bounds"
        if n < 3 or len(self.claims) != n - 1:
            return f"{len(self.claims)} claims, not those of all {n - 1} other members (of at least 2)"
        reducer = self.members[result.part]
        if not result.about(result.round, result.group_id, result.phase, self.members, result.part) \
                or result.signer() != reducer:
            return "the result's statement is not its reducer's"
        signers = set()
        for claim in self.claims:
            if not claim.about(result.round, result.group_id, result.phase, self.members, INPUTS):
                return "a claim about another round, group or phase"
            signer = claim.signer()
            if signer is None or signer not in self.members or signer == reducer or signer in signers:
                return "a claim that does not verify, or not by another member"
            signers.add(signer)
        largest = max(claim.norms[result.part] for claim in self.claims)
        if not result.norms[0] > RATIO * largest or result.norms[0] <= 0:
            return f"result norm {result.norms[0]:.3g} within {RATIO:g} x the claims' {largest:.3g}"
        return None

    def to_wire(self) -> list:
        return [WIRE_TAG, list(self.members), self.result.to_wire(), [claim.to_wire() for claim in self.claims]]

    @classmethod
    def from_wire(cls, item) -> Optional["BoundEvidence"]:
        if not (isinstance(item, list) and len(item) == 4 and item[0] == WIRE_TAG and members_in_bounds(item[1])
                and isinstance(item[3], list) and len(item[3]) < len(item[1])):
            return None
        result, claims = NormClaim.from_wire(item[2]), [NormClaim.from_wire(claim) for claim in item[3]]
        if result is None or any(claim is None for claim in claims):
            return None
        return cls(tuple(item[1]), result, tuple(claims))

    def digest(self) -> bytes:
        return hashlib.sha256(MSGPackSerializer.dumps(self.to_wire())).digest()

    def describe(self) -> str:
        """The offence, for a log line."""
        return (f"reducer {self.accused} returned a result far larger than its members' inputs in round "
                f"{self.round} (part {self.part})")


def find_oversized(members: Sequence[str], result: NormClaim, claims: dict[str, NormClaim]) -> Optional[BoundEvidence]:
    """Evidence that ``result`` (its reducer's checked statement) is out of bounds, from ``claims`` (member ->
    its checked input claim for this round), or None: it needs every other member's claim."""
    n, part = len(members), result.part
    reducer = members[part]
    chosen = [claims[member] for member in members if member != reducer and member in claims]
    if n < 3 or len(chosen) != n - 1 or not result.norms[0] > RATIO * max(claim.norms[part] for claim in chosen):
        return None
    evidence = BoundEvidence(tuple(members), result, tuple(chosen))
    return evidence if evidence.verify() is None else None
