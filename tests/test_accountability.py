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

from peers.status import format_table
from swarm.averaging.accountability import Accountability, find_equivocation, part_digest
from swarm.averaging.allreduce import run_allreduce
from swarm.averaging.exclusions import EXCLUDED, Exclusions
from swarm.averaging.group import Group
from swarm.averaging.outbox import Outbox
from swarm.averaging.robust import CenteredClip
from swarm.config.schema import BanConfig
from swarm.net import keys
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
from swarm.net.identity import peer_id_of_public_key
from swarm.net.outlier_evidence import ClipReport, OutlierEvidence, OutlierTally
from swarm.net.validators import run_validators
from swarm.telemetry.collector import Collector
from swarm.telemetry.prometheus import SwarmCollector, exposition, make_registry

pytestmark = pytest.mark.timeout(60)

NUMEL = 1000
KEYS = [RSAPrivateKey() for _ in range(4)]  # generated once: about 0.1 s each


def peer_of(key: RSAPrivateKey) -> str:
    return peer_id_of_public_key(key.get_public_key().to_bytes())


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
    assert item.accused == peer_of(KEYS[0])
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
    guard, padded = _record([evidence().to_wire() + [b"x" * 60_000]], KEYS[3])
    assert guard.check(padded)[0] == "oversized"


# ---- receipts ------------------------------------------------------------------------------------
def test_a_receipt_is_checked_against_the_bytes_the_reducer_and_the_clock():
    payloads = payloads_of(torch.arange(10.0))
    receipt = Accountability(KEYS[0]).receipt(5, b"g" * 16, 0, 2, payloads)
    check = Accountability.check
    assert check(receipt, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) is None
    assert check(receipt, peer_of(KEYS[1]), 5, b"g" * 16, 0, 2, payloads) == "receipt not signed by the part's reducer"
    assert check(receipt, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads_of(torch.zeros(10))) == "receipt of other bytes"
    assert check(receipt, peer_of(KEYS[0]), 5, b"g" * 16, 0, 3, payloads) == "receipt not signed by the part's reducer"
    assert check(None, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) == "no receipt"
    assert check(receipt, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads, not_before=get_dht_time() - 600) is None
    backdated = [receipt[0], receipt[1] - 3600, *receipt[2:]]  # the time changed after signing
    assert check(backdated, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) == "receipt not signed by the part's reducer"
    # a reducer that signs a time before the all-reduce began (to start its exclusion early) or ahead of now:
    early = _receipt_at(KEYS[0], get_dht_time() - 3600, payloads)
    assert check(early, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads) is None  # no all-reduce to compare with
    assert "from now" in check(early, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads, not_before=get_dht_time())
    ahead = _receipt_at(KEYS[0], get_dht_time() + 3600, payloads)
    assert "from now" in check(ahead, peer_of(KEYS[0]), 5, b"g" * 16, 0, 2, payloads)
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
    accused = peer_of(KEYS[0])
    assert exclusions.add([evidence(second_key=KEYS[1])], mine=False) == 0
    assert exclusions.refusal(accused) is None and exclusions.refusal(peer_of(KEYS[1])) is None
    assert exclusions.add([evidence(round_number=1)], mine=False) == 1
    assert exclusions.refusal(accused) == EXCLUDED and exclusions.refusal(peer_of(KEYS[2])) is None
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
    accused = peer_of(KEYS[0])
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
def clip_report(reducer: RSAPrivateKey, accused: str, round_number: int, part: int = 1) -> ClipReport:
    group_id = bytes([round_number]) * 16
    _, time, signature = Accountability(reducer).clip_reports(round_number, group_id, 0, part, [accused])[0]
    return ClipReport(reducer.get_public_key().to_bytes(), round_number, group_id, 0, part, time, signature)


def outlier_evidence(rounds=(1, 2, 3), reducers=(KEYS[1], KEYS[2]), accused: str = None) -> OutlierEvidence:
    accused = accused or peer_of(KEYS[0])
    return OutlierEvidence(accused, tuple(clip_report(key, accused, r, part=i + 1)
                                          for r in rounds for i, key in enumerate(reducers)))


def test_reports_of_two_reducers_a_round_prove_an_outlier_and_nothing_less_does():
    item = outlier_evidence()
    assert item.verify() is None
    again = item_from_wire(MSGPackSerializer.loads(MSGPackSerializer.dumps(item.to_wire())))
    assert again == item and again.verify() is None
    assert "fewer than 2" in outlier_evidence(reducers=(KEYS[1],)).verify()  # one hostile reducer cannot frame
    assert outlier_evidence(reducers=(KEYS[1], KEYS[1])).verify() is not None  # nor by signing twice
    assert outlier_evidence(reducers=(KEYS[0], KEYS[1])).verify() is not None  # a member does not report itself
    moved = OutlierEvidence(peer_of(KEYS[3]), item.reports)  # the reports name another member
    assert moved.verify() == "a report does not verify"
    assert decode_items([item.to_wire(), evidence().to_wire()]) is not None
    assert decode_items([moved.to_wire()]) is None
    assert item_from_wire(["outlier", "x", [[b"k", 1]]]) is None


def test_an_outlier_is_excluded_after_the_policys_rounds_and_overlapping_proofs_count_once():
    accused, now = peer_of(KEYS[0]), get_dht_time()

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
    tally, accused = OutlierTally(rounds=3), peer_of(KEYS[0])
    made = []
    for round_number in (1, 2, 3):
        assert tally.add(accused, peer_of(KEYS[1]), clip_report(KEYS[1], accused, round_number)) is None
        made.append(tally.add(accused, peer_of(KEYS[2]), clip_report(KEYS[2], accused, round_number, part=2)))
    assert made[:2] == [None, None] and made[2].verify() is None and made[2].rounds == [1, 2, 3]


def test_every_honest_member_proves_a_persistent_outlier_and_excludes_it():
    """Three rounds of four members, one sending x1000: every reducer clips it and signs a report; each
    honest member holds reports by the three honest reducers and, after the third round, excludes it."""
    exclusions = [Exclusions(dht=None, run_id="run", policy=BanConfig(base=60, cap=3600, outlier_rounds=3))
                  for _ in range(4)]
    for round_number in range(3):
        members, results = run_group(accountable=True, equivocator=-1, outlier=2, round_number=round_number)
        attacker = members[2].to_base58()
        for index, result in enumerate(results):
            if index == 2:
                continue
            assert {accused for accused, _, _ in result.clip_reports} == {attacker}
            assert len({report.signer(attacker) for _, _, report in result.clip_reports}) == 3
            assert all(report.signer(attacker) == reducer for _, reducer, report in result.clip_reports)
            assert exclusions[index].note_clips(result.clip_reports) == (1 if round_number == 2 else 0)
    for index in (0, 1, 3):
        assert exclusions[index].refusal(attacker) == EXCLUDED
        assert exclusions[index].excluded()[attacker]["reason"] == "outlier"
        assert all(exclusions[index].refusal(members[other]) is None for other in (0, 1, 3))


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


def run_group(*, accountable: bool, equivocator: int = 1, framer: int = -1, outlier: int = -1, round_number: int = 0):
    """Four members with real identities; ``equivocator`` serves its part x -10 (validly signed) to the
    members at odd positions; ``framer`` claims in its commit a receipt for part 0 that it made up;
    ``outlier`` sends its update x1000 (reducers aggregate with CenteredClip).
    Returns the members and each one's AllreduceResult."""
    by_peer = {PeerID.from_base58(peer_of(key)): key for key in KEYS}
    members = tuple(sorted(by_peer, key=lambda peer: peer.to_bytes()))
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
                return {"receipt": accounts[owner].receipt(round_number, group_id, key[1], owner, other)}, other
            return entry.header, entry.payloads
        return fetch

    async def everyone():
        return await asyncio.gather(*(
            run_allreduce(Group(round_number, group_id, members, index, (1.0,) * 4),
                          [torch.randn(NUMEL, generator=torch.Generator().manual_seed(index))
                           * (1000 if index == outlier else 1)], weight=1.0,
                          phase=0, outbox=outboxes[index], fetch=fetch_for(index),
                          accountability=accounts[index] if accountable else None,
                          **({"aggregator": CenteredClip()} if outlier >= 0 else {}))
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
