"""Outlier evidence: signed reports, by at least two reducers a round, that they clipped one member.

Robust aggregation bounds what one hostile input does to a round; this is what makes a member that is
clipped round after round leave the groups. A reducer that clipped a member's input signs a *clip
report* ``(round, group id, phase, part, accused, time)`` (:func:`clip_message`) and serves it with its
part, next to its receipt (:mod:`swarm.averaging.accountability`). :class:`OutlierEvidence` against a
member gathers such reports from several rounds: it verifies alone (every signature is its reducer's
own, no reducer accuses itself) and only if each round it names holds reports by at least
:data:`MIN_SIGNERS` distinct reducers, so one hostile reducer cannot frame a member. How many rounds
make an offence is the run's policy (``averaging.robust.ban.outlier_rounds``), applied by each reader.

It travels in the same exclusion record as equivocation evidence (:mod:`swarm.net.exclusion_record`),
tagged ``"outlier"`` on the wire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from hivemind.utils import MSGPackSerializer

from swarm.net.identity import signer_of

CLIP_TAG = b"swarm-clipped-input-v1"  # domain separation from receipts and DHT records
WIRE_TAG = "outlier"
MIN_SIGNERS = 2  # distinct reducers that must report a member in a round for the round to count
MAX_REPORTS = 16  # reports in one item: enough for 8 rounds of 2 reducers
MAX_PEER_ID_CHARS = 64  # base58 of a 34-byte multihash is 46
# Bounds on where in a run a signed statement (a clip report here, a receipt in swarm.net.exclusion_record,
# which imports them from this module, the lower of the two) can place itself
MAX_GROUP_ID_BYTES = 64  # group ids are 16 random bytes
MAX_ROUND = 2**53
MAX_PARTS = 1 << 16
MAX_PHASES = 16


def place_in_bounds(round_number: int, group_id: bytes, phase: int, part: int) -> bool:
    """Whether (round, group, phase, part) is within the bounds above: checked before any signature."""
    return (0 <= round_number <= MAX_ROUND and 0 <= phase < MAX_PHASES and 0 <= part < MAX_PARTS
            and 0 < len(group_id) <= MAX_GROUP_ID_BYTES)


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
class OutlierEvidence:
    """Reports that reducers clipped ``accused`` in several rounds."""

    accused: str  # the member's peer id (base58)
    reports: tuple[ClipReport, ...]

    @property
    def rounds(self) -> list[int]:
        return sorted({report.round for report in self.reports})

    @property
    def offence(self) -> tuple:
        """The rounds it spans: items over overlapping spans count as one offence (see excluded_peers)."""
        rounds = self.rounds
        return WIRE_TAG, rounds[0], rounds[-1]

    @property
    def time(self) -> float:
        return max(report.time for report in self.reports)

    def verify(self) -> Optional[str]:
        """None if every report is valid and each round holds reports of MIN_SIGNERS distinct reducers,
        else why not. Sizes are checked before any signature."""
        if not isinstance(self.accused, str) or not 0 < len(self.accused) <= MAX_PEER_ID_CHARS:
            return "malformed accused"
        if not 0 < len(self.reports) <= MAX_REPORTS:
            return "too many or no reports"
        if not all(place_in_bounds(report.round, report.group_id, report.phase, report.part) for report in self.reports):
            return "out of bounds"
        signers: dict[tuple, set[str]] = {}
        for report in self.reports:
            signer = report.signer(self.accused)
            if signer is None or signer == self.accused:
                return "a report does not verify"
            signers.setdefault((report.round, report.group_id), set()).add(signer)
        if len({round_number for round_number, _ in signers}) != len(signers):
            return "two groups in one round"
        if any(len(names) < MIN_SIGNERS for names in signers.values()):
            return f"a round with fewer than {MIN_SIGNERS} reducers' reports"
        return None

    def to_wire(self) -> list:
        return [WIRE_TAG, self.accused, [report.to_wire() for report in self.reports]]

    @classmethod
    def from_wire(cls, item) -> Optional["OutlierEvidence"]:
        if not isinstance(item, list) or len(item) != 3 or item[0] != WIRE_TAG or not isinstance(item[1], str) \
                or not isinstance(item[2], list) or len(item[2]) > MAX_REPORTS:
            return None
        reports = [ClipReport.from_wire(report) for report in item[2]]
        if any(report is None for report in reports):
            return None
        return cls(item[1], tuple(reports))

    def digest(self) -> bytes:
        return hashlib.sha256(MSGPackSerializer.dumps(self.to_wire())).digest()


class OutlierTally:
    """Clip reports this peer received, per accused member and round, until they make evidence.

    :param rounds: rounds (each with reports of MIN_SIGNERS reducers) that make one offence.
    """

    def __init__(self, rounds: int, max_members: int = 256):
        self.rounds, self.max_members = rounds, max_members
        self._seen: dict[str, dict[tuple, dict[str, ClipReport]]] = {}  # accused -> (round, group) -> signer -> report

    def add(self, accused: str, signer: str, report: ClipReport) -> Optional[OutlierEvidence]:
        """Count a verified report; returns evidence once ``accused`` has ``rounds`` proven rounds (and
        starts counting it afresh)."""
        if accused not in self._seen and len(self._seen) >= self.max_members:
            self._seen.pop(next(iter(self._seen)))  # bounded memory: the oldest accused is forgotten
        rounds = self._seen.setdefault(accused, {})
        rounds.setdefault((report.round, report.group_id), {}).setdefault(signer, report)
        proven = [(key, reports) for key, reports in sorted(rounds.items()) if len(reports) >= MIN_SIGNERS]
        if len(proven) < self.rounds:
            return None
        del self._seen[accused]
        chosen = [report for _, reports in proven[-self.rounds:] for report in list(reports.values())[:MIN_SIGNERS]]
        return OutlierEvidence(accused, tuple(chosen[:MAX_REPORTS]))
