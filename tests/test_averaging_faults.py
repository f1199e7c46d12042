"""The all-reduce under faults, with real averaging peers as real processes on 127.0.0.1.

Each peer is ``python -m harness.averaging_peer``: rounds of swarm's all-reduce on a known per-peer tensor,
one JSON line per round. Faults come through seams: SIGKILL of a peer's process group mid-round, a
peer's link taken down mid-round (network namespaces: needs root, skipped otherwise), a peer whose
update holds NaN, and a rogue peer that sends NaN past its own check.
"""

from __future__ import annotations

import time

import pytest
import torch

from harness import averaging_peer
from harness.netlab import Lab, available, kill_group, read_records, wait_all
from harness.processes import read_json, wait_for
from swarm.averaging.group import slice_bounds

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)


@pytest.mark.timeout(300)
def test_survivors_of_a_peer_killed_mid_allreduce_stay_identical_and_average_again(averagers):
    rounds, faulty = 5, 2
    peers = averagers.swarm(3, "--expect", "3", "--rounds", str(rounds), "--megabytes", "8", "--chunk-timeout", "5")
    victim = peers[2]
    def parts_moving() -> bool:  # the victim is in the faulty round's all-reduce and has fetched a part of it
        status = averagers.status(2)
        return status.get("state") == "allreduce" and status.get("round") == faulty \
            and status.get("parts_fetched", 0) >= 1

    wait_for(parts_moving, timeout=180, period=0.005, what="parts moving in the faulty round", alive=peers)
    victim.kill_group()
    killed_at = time.monotonic()
    for survivor in peers[:2]:
        assert survivor.proc.wait(120) == 0, survivor.log_tail()
    took = time.monotonic() - killed_at

    a, b = averagers.records(0), averagers.records(1)
    for round_number in range(faulty, rounds):
        assert a[round_number]["ok"] and b[round_number]["ok"], (a[round_number], b[round_number])
        assert a[round_number]["finite"] and b[round_number]["finite"]
        assert a[round_number]["hash"] == b[round_number]["hash"], f"survivors disagree after round {round_number}"
    assert a[faulty]["group_size"] == 3 and a[faulty]["seconds"] < 2 * 5 + 5, "detection must be bounded by the chunk timeout"
    assert a[faulty + 1]["group_size"] == b[faulty + 1]["group_size"] == 2, "the survivors must average together next"
    assert took < 60, f"survivors needed {took:.0f}s to finish after the kill"


@pytest.mark.timeout(300)
@pytest.mark.skipif(available() is not None, reason=available() or "")
def test_survivors_of_a_member_whose_link_dies_average_together_next_round(tmp_path):
    """The kill scenario's link-down trial (benchmarks/kill_scenario.py), once: the victim's link goes
    down in the middle of round 1 and the process lives on. The survivors' DHT calls then wait out the
    unreachable node, so each one's progress record looks stale to the other just as round 2 starts;
    they used to split into groups of one there (5 of 17 trials of the benchmark, under load). This
    end-to-end check passed 4 of 4 times without the fix on this machine (a race); the checks that
    fail without it every time are in test_matchmaking.py and test_round_tracker.py."""
    victim, survivors = 0, [1, 2]  # host 0 is everyone's initial peer, the hardest one to lose
    with Lab(3, rate="100mbit", burst="64kb", latency="200ms") as lab:
        procs = averaging_peer.start_in_lab(lab, tmp_path, [0, 1, 2], [
            "--rounds", "3", "--expect", "3", "--megabytes", "8", "--chunk-timeout", "5", "--request-timeout", "3"])
        try:
            def parts_moving() -> bool:  # the victim is in round 1's all-reduce and has fetched a part of it
                status = read_json(tmp_path / f"s{victim}.json") or {}
                return status.get("state") == "allreduce" and status.get("round") == 1 \
                    and status.get("parts_fetched", 0) >= 1

            wait_for(parts_moving, timeout=150, period=0.005, what="parts moving in round 1")
            lab.link(victim, up=False)
            cut_at = time.time()
            assert wait_all([procs[host] for host in survivors], 150), "the survivors did not finish"
        finally:
            for proc in procs.values():
                kill_group(proc)
    records = [{r["round"]: r for r in read_records(tmp_path / f"p{host}.jsonl")} for host in survivors]
    first, second = ([r.get(round_number, {}) for r in records] for round_number in (1, 2))
    assert all(r.get("ok") for r in first) and first[0]["hash"] == first[1]["hash"], first
    assert [r.get("group_size") for r in second] == [2, 2], f"the survivors split in round 2: {second}"
    assert second[0]["hash"] == second[1]["hash"] and sorted(second[0]["members"]) == sorted(r["me"] for r in second)
    took = max(r["ended_at"] for r in second) - cut_at
    assert took < 60, f"round 2 ended {took:.0f}s after the link went down"


def _exact_average(indices: list[int], round_number: int, numel: int) -> torch.Tensor:
    return torch.stack([averaging_peer.contribution(index, round_number, numel) for index in indices]).mean(0)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("rogue", [False, True], ids=["nan-update-abstains", "rogue-sends-nan"])
def test_nan_from_one_peer_never_reaches_the_average(averagers, tmp_path, rogue):
    poisoned = 2

    def extra_for(index: int) -> list[str]:
        extra = ["--dump", str(tmp_path / f"dump{index}")]
        if index == poisoned:
            extra += ["--nan-at-round", "1"] + (["--rogue"] if rogue else [])
        return extra

    peers = averagers.swarm(3, "--expect", "3", "--rounds", "3", "--megabytes", "1", extra_for=extra_for)
    for peer in peers:
        assert peer.proc.wait(150) == 0, peer.log_tail()

    # Every honest peer that took part in the poisoned round ends it finite, exact wherever a part was
    # kept, and identical to the others. The rogue's own part (it reduced NaN) is dropped by everyone.
    # Rarely, a libp2p stream between two honest peers also breaks off (a stream reset reads as its
    # end): then that part is dropped too, or a peer misses the round, which is the fault handling at
    # work, not NaN getting through.
    honest = [0, 1]
    took_part = [index for index in honest if averagers.records(index)[1].get("ok")]
    assert took_part, [averagers.records(index)[1] for index in honest]
    hashes = set()
    for index in took_part:
        record = averagers.records(index)[1]
        assert record["finite"], record
        result = torch.load(tmp_path / f"dump{index}" / "round1.pt")
        assert torch.isfinite(result).all()
        # the honest members whose inputs the round took (under load one may have been cut as gone)
        counted = [index for short, index in _indices_of(averagers, 3).items()
                   if index in honest and short in record["members"] and short not in record.get("gone", [])]
        expected = _exact_average(counted, 1, record["numel"])
        bounds = slice_bounds(record["numel"], record["group_size"])
        for part, (start, stop) in enumerate(bounds):
            if part in record["missing_parts"]:
                assert not result[start:stop].any(), f"dropped part {part} is not zero"
            else:
                assert torch.allclose(result[start:stop], expected[start:stop], atol=1e-5), f"part {part}"
        if rogue:  # its part holds the NaN it reduced: every receiver refuses it
            assert record["members"].index(averagers.records(poisoned)[0]["me"]) in record["missing_parts"], record
        hashes.add(record["hash"])
    assert len(hashes) == 1, "honest peers disagree"
    log = (tmp_path / "averager0.log").read_text() + (tmp_path / "averager1.log").read_text()
    if rogue:
        assert "refused an input" in log
    else:
        assert "holds NaN/Inf; it abstains" in (tmp_path / f"averager{poisoned}.log").read_text()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("checked", [True, False], ids=["fetchers-checked", "defence-off"])
def test_a_member_cannot_fetch_slices_of_another_members_update(averagers, checked):
    """A curious member (a real process) asks the other members for the slices of their updates that
    a third member reduces: refused and counted, and the round still averages. With the check turned
    off on the honest peers, the same requests return the slices: the attack the check stops."""
    snooper = 2
    extra_for = lambda index: ["--snoop"] if index == snooper else ([] if checked else ["--no-fetch-check"])  # noqa: E731
    peers = averagers.swarm(3, "--expect", "3", "--rounds", "2", "--megabytes", "1", extra_for=extra_for)
    for peer in peers:
        assert peer.proc.wait(150) == 0, peer.log_tail()
    records = [record for record in averagers.records(snooper).values() if record.get("ok") and record["group_size"] == 3]
    assert records, averagers.records(snooper)
    snooped = sum(record["snooped"] for record in records)
    refused = sum(record["snoop_refused"] for record in records)
    if checked:
        assert snooped == 0 and refused == 2 * len(records), records
        assert "refused a fetch of" in peers[0].log_tail(200) + peers[1].log_tail(200)
        assert all(record.get("ok") for index in (0, 1) for record in averagers.records(index).values())
    else:
        assert snooped >= 1, records


def _indices_of(averagers, count: int) -> dict[str, int]:
    """Short peer id (as in the records' ``members``) -> harness index."""
    return {next(iter(averagers.records(index).values()))["me"]: index for index in range(count)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("defended", [True, False], ids=["defended", "defence-off"])
def test_a_member_reporting_every_part_missing_does_not_zero_the_others_update(averagers, tmp_path, defended):
    """A member (a real process, ``--veto``) reports every part missing in its commit, round after round.
    Its report counts only for itself: the honest members keep the exact average of every member's
    contribution (the vetoer's included: it sent its inputs and reduced its part) and stay identical.
    With the defence off (``--drop-reported`` on the honest members: every member drops the union of
    the reports, the rule before issue 11) the same report zeroes the whole update for all of them."""
    vetoer, honest = 3, [0, 1, 2]

    def extra_for(index: int) -> list[str]:
        if index == vetoer:
            return ["--veto"]
        return ["--dump", str(tmp_path / f"dump{index}")] + ([] if defended else ["--drop-reported"])

    peers = averagers.swarm(4, "--expect", "4", "--rounds", "2", "--megabytes", "1", extra_for=extra_for)
    for peer in peers:
        assert peer.proc.wait(200) == 0, peer.log_tail()
    index_of = _indices_of(averagers, 4)
    vetoer_id, vetoed = averagers.records(vetoer)[0]["me"], 0
    for round_number in range(2):
        records = [averagers.records(index).get(round_number, {}) for index in honest]
        # A member whose commit was not read has no say (under either rule): in the last round a peer that
        # finished exits, and a slower one may no longer read its commit.
        records = [record for record in records if record.get("ok") and vetoer_id in record["members"]
                   and (defended or vetoer_id not in record["gone"])]
        for record in records:
            result = torch.load(tmp_path / f"dump{index_of[record['me']]}" / f"round{round_number}.pt")
            if defended:
                members = [index_of[member] for member in record["members"]]
                assert record["missing_parts"] == [], record
                assert torch.allclose(result, _exact_average(members, round_number, record["numel"]), atol=1e-5)
            else:
                assert record["missing_parts"] == list(range(record["group_size"])), record
                assert not result.any(), "the veto zeroed the whole update"
        assert len({record["hash"] for record in records}) <= 1, f"honest members disagree in round {round_number}"
        vetoed += len(records)
    assert vetoed >= 2, "no round with the vetoer and two honest members in one group"


@pytest.mark.timeout(300)
def test_a_member_that_only_heartbeats_is_cut_and_left_out_of_the_next_round(averagers, tmp_path):
    """A member (a real process, ``--stall``) answers every fetch of its inputs and reduced part with
    heartbeats alone. It used to hold the round until the round's timeout (30 s here: the round failed);
    now each honest member cuts it after the chunk timeout (3 s, plus the little time it had spent in
    the all-reduce), finishes the round without its input and with its part set to zero (identically),
    and the next round forms without it."""
    staller, honest, chunk = 2, [0, 1], 3.0
    extra_for = lambda index: ["--stall"] if index == staller else ["--dump", str(tmp_path / f"dump{index}")]  # noqa: E731
    peers = averagers.swarm(3, "--expect", "3", "--rounds", "2", "--megabytes", "1", "--chunk-timeout", str(chunk),
                            "--round-timeout", "30", "--trace", extra_for=extra_for)
    for peer in peers:
        assert peer.proc.wait(200) == 0, peer.log_tail()
    index_of = _indices_of(averagers, 3)
    stalled_id = averagers.records(staller)[0]["me"]
    first = [averagers.records(index)[0] for index in honest]
    cut_after = []
    for record in first:
        assert record["ok"] and record["group_size"] == 3, record
        assert record["gone"] == [stalled_id], record
        part = record["members"].index(stalled_id)
        assert record["missing_parts"] == [part], record
        stalled = [fetch for fetch in record["fetches"] if fetch["peer"] == stalled_id and "error" in fetch]
        assert stalled and all(fetch["error"] == "Stalled" for fetch in stalled), record["fetches"]
        cut_after += [round(fetch["end"] - fetch["start"], 2) for fetch in stalled]
        assert record["seconds"] < 4 * chunk + 10, f"the round took {record['seconds']:.1f}s"
        result = torch.load(tmp_path / f"dump{index_of[record['me']]}" / "round0.pt")
        expected = _exact_average(honest, 0, record["numel"])  # the staller's input never came
        expected[slice(*slice_bounds(record["numel"], 3)[part])] = 0
        assert torch.allclose(result, expected, atol=1e-5)
    print(f"stalled fetches cut after {cut_after} s; rounds took {[round(r['seconds'], 2) for r in first]} s")
    assert first[0]["hash"] == first[1]["hash"]
    second = [averagers.records(index)[1] for index in honest]
    assert all(record["ok"] for record in second), second
    assert [sorted(record["members"]) for record in second] == [sorted(r["me"] for r in first)] * 2, second
    left_out = averagers.records(staller).get(1, {})
    assert not left_out.get("ok") or left_out["group_size"] == 1, left_out

HOSTILE_REDUCER, HONEST_MEMBERS = 3, [0, 1, 2]  # the averagers of _hostile_reducer_round


def _hostile_reducer_round(averagers, attack: str, defended: bool) -> tuple[str, list[dict]]:
    """Four processes, member HOSTILE_REDUCER playing ``attack`` as a reducer (3 rounds defended, else 1,
    with ``--no-accountability`` on the honest members); returns the attacker's id and the honest members'
    round-0 records, each checked to be a full, finite round."""
    def extra_for(index: int) -> list[str]:
        return [attack] if index == HOSTILE_REDUCER else ([] if defended else ["--no-accountability"])

    peers = averagers.swarm(4, "--expect", "4", "--rounds", "3" if defended else "1", "--megabytes", "1",
                            "--round-timeout", "10", extra_for=extra_for)
    for index in HONEST_MEMBERS:
        assert peers[index].proc.wait(200) == 0, peers[index].log_tail()
    assert peers[HOSTILE_REDUCER].proc.wait(120) == 0, peers[HOSTILE_REDUCER].log_tail()
    first = [averagers.records(index)[0] for index in HONEST_MEMBERS]
    assert all(record["ok"] and record["group_size"] == 4 and record["finite"] for record in first), first
    return averagers.records(HOSTILE_REDUCER)[0]["me"], first


@pytest.mark.timeout(300)
@pytest.mark.parametrize("defended", [True, False], ids=["defended", "defence-off"])
def test_a_reducer_returning_different_results_is_caught_and_excluded(averagers, defended):
    """A member (a real process, ``--equivocate``) reduces its part honestly but serves half the members
    another result (x -10), validly signed. The members compare the reducers' signed receipts in their
    commits: every honest member holds two receipts of one reducer over different results (proof anyone
    can check), drops that part alike, and stays identical to the others; the reducer is then excluded
    (refused at matchmaking and in every RPC) from the next rounds, beyond the one round a member that
    failed to answer is left out. With the defence off (``--no-accountability`` on the honest members)
    the same reducer leaves the honest members with different models."""
    accused, first = _hostile_reducer_round(averagers, "--equivocate", defended)
    if not defended:
        assert len({record["hash"] for record in first}) > 1, "the equivocation did not split the honest members"
        return
    for record in first:
        assert record["equivocators"] == [accused] and accused in record["excluded"], record
        assert record["missing_parts"] == [record["members"].index(accused)], record
    assert len({record["hash"] for record in first}) == 1, "honest members disagree after the equivocation"
    for round_number in (1, 2):
        later = [averagers.records(index)[round_number] for index in HONEST_MEMBERS]
        assert all(record["ok"] and accused not in record["members"] and record["group_size"] == 3
                   and record["finite"] and record["missing_parts"] == [] for record in later), later
        assert len({record["hash"] for record in later}) == 1, f"honest members disagree in round {round_number}"
        alone = averagers.records(HOSTILE_REDUCER).get(round_number, {})
        assert not alone.get("ok") or alone["group_size"] == 1, alone


@pytest.mark.timeout(300)
@pytest.mark.parametrize("defended", [True, False], ids=["defended", "defence-off"])
def test_a_reducer_returning_garbage_to_everyone_is_caught_and_excluded(averagers, defended):
    """A member (a real process, ``--garbage``) serves every member the same noise at 100x the norm of its
    part's true result, validly signed: the receipts all agree. Its signed statement of the result's norm
    is far beyond what the other members signed they sent (robust aggregation is on), which is proof: every
    honest member drops that part alike, stays identical to the others and finite at the honest scale, and
    excludes the reducer from the next rounds. With the defence off (``--no-accountability`` on the honest
    members) the noise goes into every honest member's model (its norm about 25x the honest average's)."""
    accused, first = _hostile_reducer_round(averagers, "--garbage", defended)
    assert len({record["hash"] for record in first}) == 1, "honest members disagree"
    scale = first[0]["numel"] ** 0.5  # the norm of one member's N(0, 1) update; the honest average's is half
    if not defended:
        assert all(record["norm"] > 5 * scale and not record["oversized"] for record in first), first
        return
    for record in first:
        assert record["oversized"] == [accused] and accused in record["excluded"], record
        assert record["missing_parts"] == [record["members"].index(accused)] and record["norm"] < scale, record
    for round_number in (1, 2):
        later = [averagers.records(index)[round_number] for index in HONEST_MEMBERS]
        assert all(record["ok"] and accused not in record["members"] and record["group_size"] == 3
                   and record["finite"] and record["missing_parts"] == [] for record in later), later
        assert len({record["hash"] for record in later}) == 1, f"honest members disagree in round {round_number}"
