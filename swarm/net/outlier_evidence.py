"""Outlier evidence: signed reports, by at least two reducers a round, that they clipped one member.

Robust aggregation bounds what one hostile input does to a round; this is what makes a member that is
clipped round after round leave the groups. A reducer that clipped a member's input signs a *clip
report* ``(round, group id, phase, part, accused, time)`` (:func:`clip_message`) and serves it with its
part, next to its receipt (:mod:`swarm.averaging.accountability`). :class:`OutlierEvidence` against a
member gathers such reports from several rounds (:class:`RoundProof` each): it verifies alone and only
if each round holds

- the accused's own signed input claim (:class:`~swarm.net.norm_claims.NormClaim`, which a reducer
  requires with every input, and passes on with its report) over the group's member list: its word
  that it was in that group. Without it, two made-up identities could sign reports about a group that
  never met and exclude any peer of an open run;
- reports by at least :data:`MIN_SIGNERS` distinct reducers of that group (each signed by the member
  that reduces the part it names, none by the accused), so one hostile reducer cannot frame a member.

How many rounds make an offence is the run's policy (``averaging.robust.ban.outlier_rounds``),
applied by each reader.

It travels in the same exclusion record as equivocation evidence (:mod:`swarm.net.exclusion_record`),
tagged ``"outlier"`` on the wire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from hivemind.utils import MSGPackSerializer

from swarm.net.identity import signer_of
from swarm.net.norm_claims import INPUTS, MAX_PEER_ID_CHARS, NormClaim, members_in_bounds, place_in_bounds

CLIP_TAG = b"swarm-clipped-input-v1"  # domain separation from receipts and DHT records
WIRE_TAG = "outlier"
MIN_SIGNERS = 2  # distinct reducers that must report a member in a round for the round to count
MAX_ROUNDS = 8  # rounds in one item (the policy's outlier_rounds is at most 8)
MAX_REPORTS_PER_ROUND = 4  # two are needed


def clip_message(round_number: int, group_id: bytes, phase: int, part: int, accused: str, time: float) -> bytes:
    """What the reducer of ``part`` signs when it clipped ``accused``'s input."""
    return CLIP_TAG + MSGPackSerializer.dumps([int(round_number), bytes(group_id), int(phase), int(part),
                                               str(accused), float(time)])


@dataclass(frozen=True)
class ClipReport:
    """One reducer's signed statement that it clipped a member's input (the member is the evidence's)."""

    key: bytes  # the reducer's OpenSSH RSA public key
    round: int
    group_id: bytes
    phase: int
    part: int
    time: float
    signature: bytes

    def signer(self, accused: str) -> Optional[str]:
        """The reducer's peer id if this is its valid report against ``accused``, else None."""
        return signer_of(self.key, clip_message(self.round, self.group_id, self.phase, self.part, accused, self.time),
                         self.signature)

    def to_wire(self) -> list:
        return [self.key, self.round, self.group_id, self.phase, self.part, self.time, self.signature]

    @classmethod
    def from_wire(cls, item) -> Optional["ClipReport"]:
        try:
            key, round_number, group_id, phase, part, time, signature = item
        except (TypeError, ValueError):
            return None
        if not (isinstance(key, bytes) and isinstance(group_id, bytes) and isinstance(signature, bytes)
                and type(round_number) is int and type(phase) is int and type(part) is int
                and type(time) in (int, float)):
            return None
        return cls(key, round_number, group_id, phase, part, float(time), signature)


@dataclass(frozen=True)
class Clip:
    """A checked clip report as a member received it: who was clipped, by which reducer, the reducer's
    report, the accused's input claim the reducer passed on, and the group's members (in part order)."""

    accused: str
    reducer: str
    report: ClipReport
    claim: NormClaim
    members: tuple[str, ...]


@dataclass(frozen=True)
class RoundProof:
    """One round in which at least two reducers clipped the accused: the group's members (in part
    order), the accused's own signed input claim over that member list (its word that it was in that
    group: no one can make up a group around it), and the reducers' reports."""

    members: tuple[str, ...]
    claim: NormClaim
    reports: tuple[ClipReport, ...]

    @property
    def round(self) -> int:
        return self.claim.round

    def verify(self, accused: str) -> Optional[str]:
        if not members_in_bounds(self.members) or accused not in self.members:
            return "malformed members"
        if not 0 < len(self.reports) <= MAX_REPORTS_PER_ROUND:
            return "too many or no reports"
        return self.claim_problem(accused) or self.reports_problem(accused)

    def claim_problem(self, accused: str) -> Optional[str]:
        """Why the claim is not the accused's own over this group (its word that it was a member), if it is not."""
        claim = self.claim
        if not claim.about(claim.round, claim.group_id, claim.phase, self.members, INPUTS) or claim.signer() != accused:
            return "no claim of the accused over this group"
        return None

    def reports_problem(self, accused: str) -> Optional[str]:
        """Why the reports do not prove the round (two reducers of the group, each of its own part), if they do not."""
        claim = self.claim
        signers = set()
        for report in self.reports:
            if (report.round, report.group_id) != (claim.round, claim.group_id) \
                    or not place_in_bounds(report.round, report.group_id, report.phase, report.part):
                return "a report about another round or group"
            signer = report.signer(accused)
            if signer is None or signer == accused or signer not in self.members \
                    or self.members.index(signer) != report.part:
                return "a report does not verify, or not by the part's reducer"
            signers.add(signer)
        if len(signers) < MIN_SIGNERS:
            return f"a round with fewer than {MIN_SIGNERS} reducers' reports"
        return None

    def to_wire(self) -> list:
        return [list(self.members), self.claim.to_wire(), [report.to_wire() for report in self.reports]]

    @classmethod
    def from_wire(cls, item) -> Optional["RoundProof"]:
        if not (isinstance(item, list) and len(item) == 3 and members_in_bounds(item[0]) and isinstance(item[2], list)
                and len(item[2]) <= MAX_REPORTS_PER_ROUND):
            return None
        claim, reports = NormClaim.from_wire(item[1]), [ClipReport.from_wire(report) for report in item[2]]
        if claim is None or any(report is None for report in reports):
            return None
        return cls(tuple(item[0]), claim, tuple(reports))


@dataclass(frozen=True)
class OutlierEvidence:
    """Rounds in which reducers clipped ``accused``: one :class:`RoundProof` per round."""

    accused: str  # the member's peer id (base58)
    proofs: tuple[RoundProof, ...]

    @property
    def rounds(self) -> list[int]:
        return sorted({proof.round for proof in self.proofs})

    @property
    def offence(self) -> tuple:
        """The rounds it spans: items over overlapping spans count as one offence (see excluded_peers)."""
        rounds = self.rounds
        return WIRE_TAG, rounds[0], rounds[-1]

    @property
    def time(self) -> float:
        return max(report.time for proof in self.proofs for report in proof.reports)

    def verify(self) -> Optional[str]:
        """None if every round's proof holds (distinct rounds), else why not. Sizes before any signature."""
        if not isinstance(self.accused, str) or not 0 < len(self.accused) <= MAX_PEER_ID_CHARS:
            return "malformed accused"
        if not 0 < len(self.proofs) <= MAX_ROUNDS:
            return "too many or no rounds"
        if len(self.rounds) != len(self.proofs):
            return "two proofs of one round"
        for proof in self.proofs:
            why = proof.verify(self.accused)
            if why is not None:
                return why
        return None

    def to_wire(self) -> list:
        return [WIRE_TAG, self.accused, [proof.to_wire() for proof in self.proofs]]

    @classmethod
    def from_wire(cls, item) -> Optional["OutlierEvidence"]:
        if not isinstance(item, list) or len(item) != 3 or item[0] != WIRE_TAG or not isinstance(item[1], str) \
                or not isinstance(item[2], list) or len(item[2]) > MAX_ROUNDS:
            return None
        proofs = [RoundProof.from_wire(proof) for proof in item[2]]
        if any(proof is None for proof in proofs):
            return None
        return cls(item[1], tuple(proofs))

    def digest(self) -> bytes:
        return hashlib.sha256(MSGPackSerializer.dumps(self.to_wire())).digest()

    def describe(self) -> str:
        """The offence, for a log line."""
        return f"member {self.accused} was clipped as an outlier by two reducers in each of rounds {self.rounds}"


class OutlierTally:
    """Clip reports this peer received, per accused member and round, until they make evidence.

    :param rounds: rounds (each with reports of MIN_SIGNERS reducers) that make one offence.
    """

    def __init__(self, rounds: int, max_members: int = 256):
        self.rounds, self.max_members = rounds, max_members
        # accused -> (round, group) -> (members, the accused's claim, signer -> report)
        self._seen: dict[str, dict[tuple, tuple[tuple, NormClaim, dict[str, ClipReport]]]] = {}

    def add(self, clip: Clip) -> Optional[OutlierEvidence]:
        """Count a checked report; returns evidence once its accused has ``rounds`` proven rounds (and starts
        counting it afresh)."""
        accused, report = clip.accused, clip.report
        if accused not in self._seen and len(self._seen) >= self.max_members:
            self._seen.pop(next(iter(self._seen)))  # bounded memory: the oldest accused is forgotten
        rounds = self._seen.setdefault(accused, {})
        _, _, reports = rounds.setdefault((report.round, report.group_id), (tuple(clip.members), clip.claim, {}))
        reports.setdefault(clip.reducer, report)
        proven = [(key, entry) for key, entry in sorted(rounds.items()) if len(entry[2]) >= MIN_SIGNERS]
        if len(proven) < self.rounds:
            return None
        del self._seen[accused]
        return OutlierEvidence(accused, tuple(
            RoundProof(members, claim, tuple(list(reports.values())[:MIN_SIGNERS]))
            for _, (members, claim, reports) in proven[-self.rounds:]))
