"""Reducer accountability: a reducer signs what it returns; members compare what they received.

The reducer of part ``j`` puts a *receipt* in the header of the result it serves: its public key, the
time, the digest (sha256) of the result's bytes, and its signature over ``(round, group, phase, j,
time, digest)`` (:func:`swarm.net.exclusion_record.receipt_message`). A member refuses a result whose
receipt is missing, does not verify, names another signer than the part's reducer, does not match the
bytes, or is dated before the all-reduce began or after now (each with :data:`RECEIPT_SLACK` seconds
for clocks that differ); a relayed part (repair) carries its reducer's receipt, so it is checked the same way.

The members then compare: each one's commit (a message the all-reduce exchanges anyway) lists the
receipts it holds, one per part. Two valid receipts of one reducer over different digests for one part
are :class:`~swarm.net.exclusion_record.Evidence` of equivocation: every member that reads them drops
that part (set to zero, alike on every such member, so honest members stay identical) and counts the
reducer as gone, and the evidence goes to :class:`swarm.averaging.exclusions.Exclusions`.

Cost: per part served, one RSA-2048 signature (about 1 ms) and one sha256 of the part (about 1 ms per
2 MB on this machine); per part received, one sha256 and one verification (about 0.05 ms); per member
and round, a commit larger by about 650 bytes per part (key 380, signature 256, digest 32), and a result
header larger by about as much.

A reducer also signs a *clip report* for each member whose input robust aggregation clipped in its part
(:func:`swarm.net.outlier_evidence.clip_message`), served with the part; members check each one
(:meth:`Accountability.check_clips`) and count them (:class:`swarm.net.outlier_evidence.OutlierTally`):
reports by two reducers in each of ``averaging.robust.ban.outlier_rounds`` rounds exclude the member.
Cost: one signature per clipped member per round for the reducer, one verification per report received.

What it does not catch: a reducer that returns one consistent but wrong result to everyone. Every
receipt then agrees. The check that would catch it is spot re-computation (see docs/robust-averaging.md).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.net.exclusion_record import DIGEST_BYTES, Evidence, receipt_message
from swarm.net.identity import signer_of
from swarm.net.norm_claims import INPUTS, NormClaim, claim_from_header
from swarm.net.outlier_evidence import Clip, ClipReport, clip_message

RECEIPT_SLACK = 30.0  # seconds a receipt's time may differ from this peer's clock (DHT time), as for DHT records


def part_digest(payloads: list[runtime_pb2.Tensor]) -> bytes:
    """sha256 over what decoding reads of each payload: codec, dtype, shape and bytes (not the streaming
    fields, which differ between the sent and the received copy)."""
    digest = hashlib.sha256()
    for payload in payloads:
        header = f"{payload.compression}|{payload.dtype}|{','.join(map(str, payload.size))}|{len(payload.buffer)}|"
        digest.update(header.encode())
        digest.update(payload.buffer)
    return digest.digest()


def part_norm(pieces) -> float:
    """The L2 norm of a decoded part given as pieces (one per bucket), summed in float64: what members sign
    of their inputs and reducers of their results (:class:`swarm.net.norm_claims.NormClaim`)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(piece, dtype=torch.float64)) ** 2 for piece in pieces))


class Accountability:
    """Signs this peer's receipts and checks others'. One per averaging service.

    :param private_key: this peer's identity key (the one its peer id comes from).
    """

    def __init__(self, private_key: RSAPrivateKey):
        self.private_key = private_key
        self.public_key = private_key.get_public_key().to_bytes()

    def receipt(self, round_number: int, group_id: bytes, phase: int, part: int,
                payloads: list[runtime_pb2.Tensor]) -> list:
        """[key, time, digest, signature] for the result this peer serves for ``part``."""
        time, digest = get_dht_time(), part_digest(payloads)
        signature = self.private_key.sign(receipt_message(round_number, group_id, phase, part, time, digest))
        return [self.public_key, time, digest, signature]

    def sign_norms(self, round_number: int, group_id: bytes, phase: int, members: list[str], part: int,
                   norms: list[float]) -> NormClaim:
        """This peer's signed input norms (``part`` INPUTS) or result norm (its ``part``) for this round."""
        return NormClaim.sign(self.private_key, round_number, group_id, phase, members, part, get_dht_time(), norms)

    def clip_reports(self, round_number: int, group_id: bytes, phase: int, part: int,
                     accused: list[tuple[str, NormClaim]]) -> list:
        """[[accused, time, signature, its claim], ...]: this peer, reducer of ``part``, clipped their inputs;
        each report passes on the accused's own input claim (its word that it was in this group)."""
        time = get_dht_time()
        return [[peer, time, self.private_key.sign(clip_message(round_number, group_id, phase, part, peer, time)),
                 claim.to_wire()] for peer, claim in accused]

    @staticmethod
    def check_clips(reports, receipt: list, members: list[str], round_number: int, group_id: bytes, phase: int,
                    part: int) -> list[Clip]:
        """Each valid report in ``reports`` (a part's header: untrusted) by the reducer whose checked
        ``receipt`` came with them, against another member of the group that signed its input claim over
        this group, dated within :data:`RECEIPT_SLACK` of the receipt. Anything else is ignored."""
        if not isinstance(reports, list) or len(reports) >= len(members):
            return []
        reducer, key, found = members[part], receipt[0], []
        for item in reports:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and item[0] in members
                    and item[0] != reducer and type(item[1]) in (int, float) and isinstance(item[2], bytes)
                    and abs(item[1] - receipt[1]) <= RECEIPT_SLACK):
                continue
            claim = claim_from_header(item[3], item[0], round_number, group_id, phase, members, INPUTS)
            report = ClipReport(key, round_number, group_id, phase, part, float(item[1]), item[2])
            if claim is not None and report.signer(item[0]) == reducer:
                found.append(Clip(item[0], reducer, report, claim, tuple(members)))
        return found

    @staticmethod
    def check(receipt, reducer: str, round_number: int, group_id: bytes, phase: int, part: int,
              payloads: Optional[list[runtime_pb2.Tensor]] = None, *,
              not_before: Optional[float] = None) -> Optional[str]:
        """None if ``receipt`` is ``reducer``'s valid receipt for ``part`` (and for ``payloads``, if given),
        else why not. A receipt dated ahead of this peer's clock, or before ``not_before`` (DHT time: when
        this peer's all-reduce began), by more than :data:`RECEIPT_SLACK`, is refused: the time is what an
        exclusion counts from, so an offender must not choose it."""
        if not isinstance(receipt, list) or len(receipt) != 4:
            return "no receipt"
        key, time, digest, signature = receipt
        if type(time) not in (int, float) or not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            return "malformed receipt"
        if time > get_dht_time() + RECEIPT_SLACK or (not_before is not None and time < not_before - RECEIPT_SLACK):
            return f"receipt dated {time - get_dht_time():+.0f}s from now"
        if payloads is not None and part_digest(payloads) != digest:
            return "receipt of other bytes"
        signer = signer_of(key, receipt_message(round_number, group_id, phase, part, float(time), digest), signature)
        if signer != reducer:
            return "receipt not signed by the part's reducer"
        return None


def find_equivocation(receipts: list[list], round_number: int, group_id: bytes, phase: int,
                      part: int) -> Optional[Evidence]:
    """Evidence from two valid receipts (already checked) of one part over different digests, or None."""
    by_digest: dict[bytes, list] = {}
    for receipt in receipts:
        by_digest.setdefault(receipt[2], receipt)
    if len(by_digest) < 2:
        return None
    first, second = list(by_digest.values())[:2]
    return Evidence(first[0], round_number, group_id, phase, part, (float(first[1]), first[2], first[3]),
                    (float(second[1]), second[2], second[3]))
