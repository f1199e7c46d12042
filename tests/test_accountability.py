"""Reducer accountability and its consequences, in one process (swarm.averaging.accountability,
.exclusions, swarm.net.exclusion_record).

Evidence of equivocation must verify alone and nothing else may pass for it: forged signatures, a
receipt of another key, equal digests, oversized records. The all-reduce part runs four members as
coroutines (as test_allreduce.py does) with real RSA identities, one of which, as a reducer, serves a
different, validly signed result to half the members: with accountability every member catches it and
drops its part alike; without it the members end with different results (the attack). The same over
libp2p, with real processes, is in test_averaging_faults.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from harness.hostile import GARBAGE_SCALE, Garbage
from peers.status import format_table
from swarm.averaging.accountability import Accountability, find_equivocation, part_digest
from swarm.averaging.allreduce import run_allreduce
from swarm.averaging.exclusions import EXCLUDED, Exclusions
from swarm.averaging.group import Group
from swarm.averaging.outbox import Outbox
from swarm.averaging.robust import CenteredClip, WeightedMean
from swarm.config.schema import BanConfig
from swarm.net import keys
from swarm.net.bound_evidence import BoundEvidence, find_oversized
from swarm.net.exclusion_record import (
    MAX_EVIDENCE,
    Evidence,
    ExclusionRecordGuard,
    decode_items,
    excluded_peers,
    exclusion_seconds,
    item_from_wire,
    receipt_message,
)
from swarm.net.identity import peer_id_of_private_key
from swarm.net.norm_claims import INPUTS, NormClaim
from swarm.net.outlier_evidence import Clip, ClipReport, OutlierEvidence, OutlierTally, RoundProof, clip_message
from swarm.net.validators import run_validators
from swarm.telemetry.collector import Collector
from swarm.telemetry.prometheus import SwarmCollector, exposition, make_registry

pytestmark = pytest.mark.timeout(60)

NUMEL = 1000
KEYS = [RSAPrivateKey() for _ in range(4)]  # generated once: about 0.1 s each


def payloads_of(values: torch.Tensor) -> list:
    return [serialize_torch_tensor(values)]


def evidence(key=KEYS[0], *, round_number=3, part=1, second_key=None, same=False) -> Evidence:
    """Proof that ``key``'s reducer signed two results for one part (``second_key`` signs the second
    receipt instead: a forgery; ``same``: both over one result)."""
    group_id = b"g" * 16
    a = Accountability(key).receipt(round_number, group_id, 0, part, payloads_of(torch.ones(4)))
    b = Accountability(second_key or key).receipt(round_number, group_id, 0, part,
                                                  payloads_of(torch.ones(4) * (1 if same else 2)))
    return Evidence(a[0], round_number, group_id, 0, part, (a[1], a[2], a[3]), (b[1], b[2], b[3]))


# ---- evidence ------------------------------------------------------------------------------------
def test_two_receipts_over_different_results_are_proof_that_anyone_verifies():
    item = evidence()
    assert item.verify() is None
    assert item.accused == peer_id_of_private_key(KEYS[0])
    again = Evidence.from_wire(MSGPackSerializer.loads(MSGPackSerializer.dumps(item.to_wire())))
    assert again == item and again.verify() is None


def test_a_receipt_signed_by_another_key_is_no_proof():
    assert evidence(second_key=KEYS[1]).verify() == "a signature does not verify"


def test_a_tampered_digest_or_signature_is_no_proof():
    item = evidence()
    t, d, s = item.second
    forged_digest = Evidence(item.key, item.round, item.group_id, item.phase, item.part, item.first,
                             (t, bytes(32), s))
    assert forged_digest.verify() == "a signature does not verify"
    forged_signature = Evidence(item.key, item.round, item.group_id, item.phase, item.part, item.first,
                                (t, d, bytes(len(s))))
    assert forged_signature.verify() == "a signature does not verify"
    moved = Evidence(item.key, item.round + 1, item.group_id, item.phase, item.part, item.first, item.second)
    assert moved.verify() == "a signature does not verify"  # the receipts were for another round


def test_two_receipts_over_equal_results_are_no_proof():
    assert evidence(same=True).verify() == "equal digests: no equivocation"


def test_malformed_items_are_refused_before_any_verification():
    assert Evidence.from_wire(["key", 1]) is None
    assert Evidence.from_wire([b"k", 1, b"g", 0, 0, [0.0, b"d", "not bytes"], [0.0, b"d", b"s"]]) is None
    oversized_key = evidence()
    oversized_key = Evidence(b"x" * 5000, *oversized_key.to_wire()[1:5], oversized_key.first, oversized_key.second)
    assert oversized_key.verify() is not None
    assert decode_items([evidence().to_wire()] * (MAX_EVIDENCE + 1)) is None  # too many items
    assert decode_items([evidence().to_wire(), evidence(same=True).to_wire()]) is None  # one bad item spoils it


def _record(value, signer: RSAPrivateKey, run_id="run") -> tuple[ExclusionRecordGuard, DHTRecord]:
    """A signed exclusion record as a DHT node receives it, and the guard that node runs."""
    signatures = RSASignatureValidator(signer)
    guard = ExclusionRecordGuard(run_id, signatures)
    record = DHTRecord(key=DHTID.generate(source=keys.exclusions(run_id)).to_bytes(),
                       subkey=MSGPackSerializer.dumps(signatures.local_public_key),
                       value=MSGPackSerializer.dumps(value), expiration_time=get_dht_time() + 600)
    return guard, DHTRecord(record.key, record.subkey, signatures.sign_value(record), record.expiration_time)


def test_dht_nodes_keep_verified_evidence_and_refuse_forged_or_oversized_records():
    guard, genuine = _record([evidence().to_wire(), evidence(KEYS[2]).to_wire()], KEYS[3])
    assert guard.check(genuine) == (None, "")
    guard, forged = _record([evidence(second_key=KEYS[1]).to_wire()], KEYS[3])
    assert guard.check(forged)[0] == "forged"
    node = CompositeValidator(run_validators("run", KEYS[2]))  # what every swarm DHT node runs
    assert node.validate(genuine) and not node.validate(forged)
    guard, padded = _record([evidence().to_wire() + [b"x" * 70_000]], KEYS[3])
    assert guard.check(padded)[0] == "oversized"


# ---- receipts ------------------------------------------------------------------------------------
def test_a_receipt_is_checked_against_the_bytes_the_reducer_and_the_clock():
    payloads = payloads_of(torch.arange(10.0))
    receipt = Accountability(KEYS[0]).receipt(5, b"g" * 16, 0, 2, payloads)
    check = Accountability.check
    assert check(receipt, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) is None
    assert check(receipt, peer_id_of_private_key(KEYS[1]), 5, b"g" * 16, 0, 2, payloads) == "receipt not signed by the part's reducer"
    assert check(receipt, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads_of(torch.zeros(10))) == "receipt of other bytes"
    assert check(receipt, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 3, payloads) == "receipt not signed by the part's reducer"
    assert check(None, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) == "no receipt"
    assert check(receipt, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads, not_before=get_dht_time() - 600) is None
    backdated = [receipt[0], receipt[1] - 3600, *receipt[2:]]  # the time changed after signing
    assert check(backdated, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) == "receipt not signed by the part's reducer"
    # a reducer that signs a time before the all-reduce began (to start its exclusion early) or ahead of now:
    early = _receipt_at(KEYS[0], get_dht_time() - 3600, payloads)
    assert check(early, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) is None  # no all-reduce to compare with
    assert "from now" in check(early, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads, not_before=get_dht_time())
    ahead = _receipt_at(KEYS[0], get_dht_time() + 3600, payloads)
    assert "from now" in check(ahead, peer_id_of_private_key(KEYS[0]), 5, b"g" * 16, 0, 2, payloads)
    assert find_equivocation([receipt, receipt], 5, b"g" * 16, 0, 2) is None


def _receipt_at(key: RSAPrivateKey, time: float, payloads) -> list:
    digest = part_digest(payloads)
    return [key.get_public_key().to_bytes(), time, digest, key.sign(receipt_message(5, b"g" * 16, 0, 2, time, digest))]


def test_the_digest_ignores_streaming_fields():
    payload = serialize_torch_tensor(torch.arange(10.0))
    chunked = type(payload)()
    chunked.CopyFrom(payload)
    chunked.chunks = 3
    assert part_digest([payload]) == part_digest([chunked])


# ---- consequences ---------------------------------------------------------------------------------
def test_exclusion_doubles_with_each_offence_up_to_the_cap():
    assert [exclusion_seconds(n, 60, 300) for n in range(5)] == [0, 60, 120, 240, 300]


def test_proof_excludes_the_reducer_longer_at_each_offence_and_a_forgery_excludes_no_one():
    exclusions = Exclusions(dht=None, run_id="run", policy=BanConfig(base=60, cap=3600))
    accused = peer_id_of_private_key(KEYS[0])
    assert exclusions.add([evidence(second_key=KEYS[1])], mine=False) == 0
    assert exclusions.refusal(accused) is None and exclusions.refusal(peer_id_of_private_key(KEYS[1])) is None
    assert exclusions.add([evidence(round_number=1)], mine=False) == 1
    assert exclusions.refusal(accused) == EXCLUDED and exclusions.refusal(peer_id_of_private_key(KEYS[2])) is None
    first = exclusions.excluded()[accused]
    assert first["offences"] == 1 and 55 < first["until"] - get_dht_time() <= 60
    assert exclusions.add([evidence(round_number=1, part=2)], mine=False) == 1  # the same round: one offence
    assert exclusions.excluded()[accused]["offences"] == 1
    exclusions.add([evidence(round_number=2)], mine=False)
    second = exclusions.excluded()[accused]
    assert second["offences"] == 2 and 115 < second["until"] - get_dht_time() <= 120
    off = Exclusions(dht=None, run_id="run", policy=None)
    off.add([evidence(round_number=1)], mine=False)
    assert off.refusal(accused) is None and off.excluded() == {}


def test_status_and_prometheus_show_who_is_excluded_until_when():
    collector = Collector(dht=None, run_id="run", max_samples_per_second=1e5, ban=BanConfig(base=60, cap=3600))
    now = get_dht_time()
    excluded = collector.excluded([evidence(round_number=1), evidence(round_number=2)], now)
    accused = peer_id_of_private_key(KEYS[0])
    assert [(row["peer_id"], row["offences"]) for row in excluded] == [(accused, 2)]
    assert 115 < excluded[0]["until"] - now <= 120
    view = collector.assemble([], {}, now=now, excluded=excluded)
    assert f"excluded {accused}: proven equivocation (2 offences), for 1m5" in format_table(view)
    text = exposition(make_registry(SwarmCollector(lambda: (view, {}), lambda: []))).decode()
    assert "swarm_peers_excluded 1.0" in text
    assert f'swarm_peer_exclusion_offences{{peer="{accused}"}} 2.0' in text
    off = Collector(dht=None, run_id="run", max_samples_per_second=1e5, ban=None)
    assert off.excluded([evidence(round_number=1)], now) == []


# ---- persistent outliers ---------------------------------------------------------------------------
NAMES = [peer_id_of_private_key(key) for key in KEYS]  # a group in part order: KEYS[i] reduces part i


def group_of(round_number: int) -> bytes:
    return bytes([round_number]) * 16


def input_claim(key: RSAPrivateKey, round_number: int, members=NAMES, norms=(1.0, 1.0, 1.0, 1.0)) -> NormClaim:
    return Accountability(key).sign_norms(round_number, group_of(round_number), 0, list(members), INPUTS, list(norms))


def clip_report(reducer: RSAPrivateKey, accused: str, round_number: int, part: int) -> ClipReport:
    claim = input_claim(KEYS[NAMES.index(accused)], round_number) if accused in NAMES else input_claim(KEYS[0], 0)
    _, time, signature, _ = Accountability(reducer).clip_reports(round_number, group_of(round_number), 0, part,
                                                                 [(accused, claim)])[0]
    return ClipReport(reducer.get_public_key().to_bytes(), round_number, group_of(round_number), 0, part, time,
                      signature)


def round_proof(round_number: int, reducers=(1, 2), accused: int = 0, members=NAMES, claimant=None) -> RoundProof:
    """Reports by KEYS[r] (reducer of part r) against member ``accused``, with ``claimant``'s claim (its own)."""
    claim = input_claim(KEYS[accused if claimant is None else claimant], round_number, members)
    return RoundProof(tuple(members), claim, tuple(clip_report(KEYS[r], members[accused], round_number, part=r)
                                                   for r in reducers))


def outlier_evidence(rounds=(1, 2, 3), reducers=(1, 2), accused: int = 0) -> OutlierEvidence:
    return OutlierEvidence(NAMES[accused], tuple(round_proof(r, reducers, accused) for r in rounds))


def test_reports_of_two_reducers_a_round_prove_an_outlier_and_nothing_less_does():
    item = outlier_evidence()
    assert item.verify() is None
    again = item_from_wire(MSGPackSerializer.loads(MSGPackSerializer.dumps(item.to_wire())))
    assert again == item and again.verify() is None
    assert "fewer than 2" in outlier_evidence(reducers=(1,)).verify()  # one hostile reducer cannot frame
    assert outlier_evidence(reducers=(1, 1)).verify() is not None  # nor by signing twice
    assert outlier_evidence(reducers=(0, 1)).verify() is not None  # a member does not report itself
    moved = OutlierEvidence(NAMES[3], item.proofs)  # the reports name another member
    assert moved.verify() is not None
    assert decode_items([item.to_wire(), evidence().to_wire()]) is not None
    assert decode_items([moved.to_wire()]) is None
    assert item_from_wire(["outlier", "x", [[b"k", 1]]]) is None


def test_reducers_cannot_frame_a_peer_they_were_never_grouped_with():
    """Two identities sign clip reports against a peer, in a "group" it never joined: without the
    accused's own claim over that member list there is no proof (before, two made-up keys could exclude
    any peer of an open run); with a claim over another group, or by someone else, neither."""
    outsiders = [RSAPrivateKey(), RSAPrivateKey()]
    made_up = [NAMES[0], peer_id_of_private_key(outsiders[0]), peer_id_of_private_key(outsiders[1]), NAMES[3]]
    claim_elsewhere = input_claim(KEYS[0], 1)  # its real claim, over its real group (NAMES)
    reports = tuple(ClipReport(key.get_public_key().to_bytes(), 1, group_of(1), 0, part, 0.0,
                               key.sign(clip_message(1, group_of(1), 0, part, NAMES[0], 0.0)))
                    for part, key in ((1, outsiders[0]), (2, outsiders[1])))
    for members, claim in ((made_up, claim_elsewhere), (NAMES, claim_elsewhere)):
        forged = OutlierEvidence(NAMES[0], (RoundProof(tuple(members), claim, reports),))
        assert forged.verify() is not None
    assert OutlierEvidence(NAMES[0], (round_proof(1, claimant=3),)).verify() == \
        "no claim of the accused over this group"
    assert OutlierEvidence(NAMES[0], (round_proof(1),)).verify() is None


def test_an_outlier_is_excluded_after_the_policys_rounds_and_overlapping_proofs_count_once():
    accused, now = peer_id_of_private_key(KEYS[0]), get_dht_time()

    def excluded(items, rounds=3):
        return excluded_peers(items, base=60, cap=3600, now=now, outlier_rounds=rounds)

    items = [outlier_evidence(rounds=(1, 2, 3))]
    assert excluded(items)[accused]["reason"] == "outlier" and excluded(items)[accused]["offences"] == 1
    assert excluded(items, rounds=4) == {} and excluded(items, rounds=None) == {}
    items.append(outlier_evidence(rounds=(2, 3, 4)))  # another member's count over the same rounds
    assert excluded(items)[accused]["offences"] == 1
    items.append(outlier_evidence(rounds=(5, 6, 7)))
    assert excluded(items)[accused]["offences"] == 2
    items.append(evidence(round_number=9))
    assert excluded(items)[accused]["reason"] == "equivocation and outlier"


def test_a_tally_makes_evidence_once_two_reducers_reported_a_member_in_enough_rounds():
    tally, made = OutlierTally(rounds=3), []
    for round_number in (1, 2, 3):
        proof = round_proof(round_number)
        clips = [Clip(NAMES[0], NAMES[r], report, proof.claim, tuple(NAMES)) for r, report in zip((1, 2), proof.reports)]
        assert tally.add(clips[0]) is None
        made.append(tally.add(clips[1]))
    assert made[:2] == [None, None] and made[2].verify() is None and made[2].rounds == [1, 2, 3]


def test_every_honest_member_proves_a_persistent_outlier_and_excludes_it():
    """Three rounds of four members, one sending x1000: every reducer clips it and signs a report; each
    honest member holds reports by the three honest reducers and, after the third round, excludes it."""
    exclusions = [Exclusions(dht=None, run_id="run", policy=BanConfig(base=60, cap=3600, outlier_rounds=3))
                  for _ in range(4)]
    off = Exclusions(dht=None, run_id="run", policy=BanConfig(base=60, cap=3600, outlier_rounds=None))
    for round_number in range(3):
        members, results = run_group(accountable=True, equivocator=-1, outlier=2, round_number=round_number)
        attacker = members[2].to_base58()
        for index, result in enumerate(results):
            if index == 2:
                continue
            assert {clip.accused for clip in result.clip_reports} == {attacker}
            assert len({clip.report.signer(attacker) for clip in result.clip_reports}) == 3
            assert all(clip.report.signer(attacker) == clip.reducer for clip in result.clip_reports)
            assert exclusions[index].note_clips(result.clip_reports) == (1 if round_number == 2 else 0)
            assert off.note_clips(result.clip_reports) == 0  # outlier_rounds: null: clipped, never excluded
    for index in (0, 1, 3):
        assert exclusions[index].refusal(attacker) == EXCLUDED
        assert exclusions[index].excluded()[attacker]["reason"] == "outlier"
        assert all(exclusions[index].refusal(members[other]) is None for other in (0, 1, 3))
    assert off.refusal(attacker) is None and off.excluded() == {}


# ---- the all-reduce --------------------------------------------------------------------------------
class FramingOutbox(Outbox):
    """A member whose commit claims it received another result for part 0, with a receipt it signed itself."""

    def __init__(self, account: Accountability):
        super().__init__()
        self.account = account

    def put(self, key: tuple, entry) -> None:
        if key[2] == "commit":
            made_up = self.account.receipt(0, key[0], key[1], 0, payloads_of(torch.ones(3)))
            entry.header["receipts"] = [[0, made_up]] + entry.header.get("receipts", [])
        super().put(key, entry)


def run_group(*, accountable: bool, equivocator: int = 1, framer: int = -1, outlier: int = -1, round_number: int = 0,
              garbage: int = -1, robust: bool = False):
    """Four members with real identities; ``equivocator`` serves its part x -10 (validly signed) to the
    members at odd positions; ``framer`` claims in its commit a receipt for part 0 that it made up;
    ``outlier`` sends its update x1000 (reducers aggregate with CenteredClip, as with ``robust``);
    ``garbage`` serves everyone noise at 100x its true result's norm (validly signed).
    Returns the members and each one's AllreduceResult."""
    by_peer = {PeerID.from_base58(peer_id_of_private_key(key)): key for key in KEYS}
    members = tuple(sorted(by_peer, key=lambda peer: peer.to_bytes()))
    names = [member.to_base58() for member in members]
    accounts = [Accountability(by_peer[peer]) for peer in members]
    group_id = os.urandom(16)
    outboxes = [FramingOutbox(accounts[index]) if index == framer else Outbox() for index in range(4)]
    for outbox in outboxes:
        outbox.open_group(group_id, members)

    def fetch_for(asker: int):
        async def fetch(peer: PeerID, key: tuple, max_bytes: int, allowance: float):
            owner = members.index(peer)
            entry = await outboxes[owner].get(key, 2.0)
            if entry is None:
                raise TimeoutError(f"member {owner} never offered {key[2:]}")
            if owner == equivocator and key[2] == "out" and key[3] == owner and asker % 2 == 1:
                other = [serialize_torch_tensor(deserialize_torch_tensor(p) * -10) for p in entry.payloads]
                norm = float(deserialize_torch_tensor(other[0]).norm())
                return {"receipt": accounts[owner].receipt(round_number, group_id, key[1], owner, other),
                        "norm": accounts[owner].sign_norms(round_number, group_id, key[1], names, owner,
                                                           [norm]).to_wire()}, other
            return entry.header, entry.payloads
        return fetch

    def aggregator(index: int):
        chosen = CenteredClip() if robust or outlier >= 0 else WeightedMean()
        return Garbage(chosen, seed=round_number) if index == garbage else chosen

    async def everyone():
        return await asyncio.gather(*(
            run_allreduce(Group(round_number, group_id, members, index, (1.0,) * 4),
                          [torch.randn(NUMEL, generator=torch.Generator().manual_seed(index))
                           * (1000 if index == outlier else 1)], weight=1.0,
                          phase=0, outbox=outboxes[index], fetch=fetch_for(index),
                          accountability=accounts[index] if accountable else None,
                          aggregator=aggregator(index))
            for index in range(4)))

    return members, asyncio.run(everyone())


def test_every_member_catches_an_equivocating_reducer_and_drops_its_part_alike():
    members, results = run_group(accountable=True, equivocator=1)
    honest = [result for index, result in enumerate(results) if index != 1]
    for result in honest:
        assert [item.accused for item in result.evidence] == [members[1].to_base58()]
        assert all(item.verify() is None for item in result.evidence)
        assert result.missing_parts == [1] and 1 in result.gone
        assert torch.isfinite(result.tensors[0]).all()
    assert all(torch.equal(result.tensors[0], honest[0].tensors[0]) for result in honest)


def test_without_accountability_the_members_end_with_different_results():
    _, results = run_group(accountable=False, equivocator=1)
    assert not torch.equal(results[0].tensors[0], results[3].tensors[0])  # 0 got the true part, 3 the other
    assert not any(result.evidence for result in results)


def test_a_member_cannot_frame_an_honest_reducer():
    """A member's commit claims a receipt it made up for another member's part: it does not verify, so
    no one drops that part or accuses its reducer."""
    members, results = run_group(accountable=True, equivocator=-1, framer=2)
    assert not any(result.evidence or result.missing_parts for result in results)
    assert all(torch.equal(result.tensors[0], results[0].tensors[0]) for result in results)


# ---- results out of bounds --------------------------------------------------------------------------
def result_statement(round_number: int, part: int, norm: float, members=NAMES) -> NormClaim:
    return Accountability(KEYS[part]).sign_norms(round_number, group_of(round_number), 0, list(members), part, [norm])


def test_a_result_far_beyond_every_other_members_claim_is_proof_and_nothing_less_is():
    claims = {NAMES[i]: input_claim(KEYS[i], 1, norms=(1.0, 2.0, 1.5, 1.0)) for i in range(4)}
    found = find_oversized(NAMES, result_statement(1, 3, 100.0), claims)
    assert found is not None and found.verify() is None and found.accused == NAMES[3]
    assert len(found.claims) == 3 and NAMES[3] not in {claim.signer() for claim in found.claims}
    again = item_from_wire(MSGPackSerializer.loads(MSGPackSerializer.dumps(found.to_wire())))
    assert again == found and decode_items([found.to_wire()]) is not None
    assert find_oversized(NAMES, result_statement(1, 3, 7.9), claims) is None  # within RATIO x the claims
    # honest members with tiny inputs (no samples this round) cannot make an honest reducer look bad:
    # every other member's claim is needed, and the largest counts
    tiny = {NAMES[i]: input_claim(KEYS[i], 1, norms=(1.0, 1.0, 1.0, 1e-3 if i < 2 else 1.0)) for i in range(4)}
    assert find_oversized(NAMES, result_statement(1, 3, 3.0), tiny) is None
    partial = BoundEvidence(tuple(NAMES), result_statement(1, 3, 3.0), (tiny[NAMES[0]], tiny[NAMES[1]]))
    assert "not those of all" in partial.verify()
    assert find_oversized(NAMES[:2], result_statement(1, 1, 100.0, NAMES[:2]), {}) is None  # a group of 2
    # claims by the reducer itself, twice by one member, over another group, or a statement of another key
    c = [claims[NAMES[i]] for i in range(4)]
    assert BoundEvidence(tuple(NAMES), result_statement(1, 3, 100.0), (c[3], c[0], c[1])).verify()
    assert BoundEvidence(tuple(NAMES), result_statement(1, 3, 100.0), (c[0], c[0], c[1])).verify()
    other = [NAMES[1], NAMES[0], NAMES[2], NAMES[3]]
    assert BoundEvidence(tuple(other), result_statement(1, 3, 100.0), (c[0], c[1], c[2])).verify()
    forged = Accountability(KEYS[2]).sign_norms(1, group_of(1), 0, NAMES, 3, [100.0])
    assert BoundEvidence(tuple(NAMES), forged, (c[0], c[1], c[2])).verify()
    now = get_dht_time()
    assert excluded_peers([found], base=60, cap=3600, now=now)[NAMES[3]]["reason"] == "oversized result"


def test_every_member_catches_a_garbage_reducer_and_drops_its_part_alike():
    """A reducer serves everyone the same noise at 100x its true result's norm, validly signed: receipts
    agree, the result's signed norm is far beyond what the members signed they sent."""
    members, results = run_group(accountable=True, equivocator=-1, garbage=1, robust=True)
    honest = [result for index, result in enumerate(results) if index != 1]
    for result in honest:
        assert [(type(item), item.accused) for item in result.evidence] == [(BoundEvidence, members[1].to_base58())]
        assert all(item.verify() is None for item in result.evidence)
        assert result.missing_parts == [1] and 1 in result.gone
    assert all(torch.equal(result.tensors[0], honest[0].tensors[0]) for result in honest)
    exclusions = Exclusions(dht=None, run_id="run", policy=BanConfig(base=60, cap=3600))
    assert exclusions.add(honest[0].evidence) == 1 and exclusions.refusal(members[1]) == EXCLUDED


def test_without_the_bound_a_garbage_reducer_s_noise_goes_into_everyones_model():
    for accountable, robust in ((False, True), (True, False)):  # unsigned, or the plain mean (no bound applies)
        _, results = run_group(accountable=accountable, equivocator=-1, garbage=1, robust=robust)
        assert not any(result.evidence or result.missing_parts for result in results)
        bounds = slice(NUMEL // 4, NUMEL // 2)  # part 1
        honest_mean = torch.stack([torch.randn(NUMEL, generator=torch.Generator().manual_seed(i))
                                   for i in range(4)]).mean(0)[bounds]
        assert results[0].tensors[0][bounds].norm() > GARBAGE_SCALE / 4 * honest_mean.norm()
