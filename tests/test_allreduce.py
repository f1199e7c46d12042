"""What the members of one all-reduce keep when parts go missing, and how long a silent-but-heartbeating
peer is waited for (swarm.averaging.allreduce, .wire), in one process.

The members are coroutines on one event loop, each with its own outbox; a fetch reads another member's
outbox directly, and a fault is a fetch that fails. The same protocol over libp2p, with real processes,
is in test_averaging_faults.py.

Before issue 11 every member dropped every part that any member reported missing: one member reporting
every part missing set the whole update to zero for all (test_a_member_reporting_every_part_missing...
fails without the fix, and shows the attack with ``drop_reported``).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from harness.hostile import HostileOutbox
from swarm.averaging import wire
from swarm.averaging.allreduce import run_allreduce
from swarm.averaging.group import Group
from swarm.averaging.outbox import Outbox

pytestmark = pytest.mark.timeout(60)

NUMEL = 1000
WAIT = 2.0  # seconds a fetch waits for an entry that never comes (a dead or cut-off member)


def contribution(index: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(index))


def average_of(indices) -> torch.Tensor:
    return torch.stack([contribution(index) for index in indices]).mean(0)


def part_bounds(size: int) -> list[slice]:
    base, extra = divmod(NUMEL, size)
    starts = [index * base + min(index, extra) for index in range(size + 1)]
    return [slice(starts[index], starts[index + 1]) for index in range(size)]


def run_group(size: int, *, fails=lambda asker, owner, key: False, veto=(), drop_reported=()):
    """An all-reduce of ``size`` members; ``fails(asker, owner, key)`` says which fetches fail (a dead
    reducer, a broken link). Returns each member's AllreduceResult."""
    members = tuple(sorted((PeerID(bytes([0x12, 0x20]) + os.urandom(32)) for _ in range(size)),
                           key=lambda peer: peer.to_bytes()))
    group_id = os.urandom(16)
    outboxes = [HostileOutbox(veto=True, stall=False, retention=60) if index in veto else Outbox()
                for index in range(size)]
    for outbox in outboxes:
        outbox.open_group(group_id, members)

    def fetch_for(asker: int):
        async def fetch(peer: PeerID, key: tuple, max_bytes: int, allowance: float):
            owner = members.index(peer)
            if fails(asker, owner, key):
                await asyncio.sleep(0.01)
                raise ConnectionError(f"member {owner} does not answer member {asker}")
            entry = await outboxes[owner].get(key, WAIT)
            if entry is None:
                raise TimeoutError(f"member {owner} never offered {key[2:]}")
            return entry.header, entry.payloads
        return fetch

    async def everyone():
        return await asyncio.gather(*(
            run_allreduce(Group(0, group_id, members, index, (1.0,) * size), [contribution(index)], weight=1.0,
                          phase=0, outbox=outboxes[index], fetch=fetch_for(index),
                          drop_reported=index in drop_reported)
            for index in range(size)))

    return asyncio.run(everyone())


def test_nothing_missing_every_member_holds_the_exact_average():
    results = run_group(3)
    for result in results:
        assert torch.allclose(result.tensors[0], average_of(range(3)), atol=1e-6)
        assert result.missing_parts == result.repaired_parts == result.gone == []


@pytest.mark.parametrize("defended", [True, False], ids=["defended", "defence-off"])
def test_a_member_reporting_every_part_missing_does_not_zero_the_update(defended):
    """Member 3 reports every part missing in its commit. Defended, the others' reports count only for
    themselves: they keep the exact average and stay identical. With the old rule (``drop_reported``
    on the honest members) the one report zeroes the whole update for all of them."""
    honest = [0, 1, 2]
    results = run_group(4, veto={3}, drop_reported=() if defended else set(honest))
    for index in honest:
        if defended:
            assert torch.allclose(results[index].tensors[0], average_of(range(4)), atol=1e-6)
            assert results[index].missing_parts == []
        else:
            assert not results[index].tensors[0].any(), "the veto zeroed the whole update"
            assert results[index].missing_parts == [0, 1, 2, 3]
        assert torch.equal(results[index].tensors[0], results[0].tensors[0])


def test_a_part_lost_between_its_reducer_and_one_member_is_fetched_from_another():
    """The link from reducer 2 to member 0 breaks after the reduce-scatter. Member 0 fetches part 2 from
    member 1, which holds it: nothing is dropped, and both hold the same average (the old rule
    dropped part 2 for everyone)."""
    def fails(asker, owner, key):
        return asker == 0 and owner == 2 and key[2] in ("out", "commit")

    results = run_group(3, fails=fails)
    for result in results:
        assert torch.allclose(result.tensors[0], average_of(range(3)), atol=1e-6)
        assert result.missing_parts == []
    assert results[0].repaired_parts == [2] and results[0].gone == [2]
    assert torch.equal(results[0].tensors[0], results[1].tensors[0])


def test_a_part_no_one_received_is_zero_on_every_member_alike():
    """Reducer 3 dies once it has fetched its inputs: no member receives part 3. Every survivor sets it
    to zero, and the survivors stay identical."""
    def fails(asker, owner, key):
        return owner == 3 and key[2] in ("out", "commit")

    results = run_group(4, fails=fails)
    expected = average_of(range(4))
    expected[part_bounds(4)[3]] = 0
    for result in results[:3]:
        assert torch.allclose(result.tensors[0], expected, atol=1e-6)
        assert result.missing_parts == [3] and result.gone == [3]
        assert torch.equal(result.tensors[0], results[0].tensors[0])


def test_a_holder_that_does_not_relay_counts_as_gone_and_the_next_holder_serves():
    """Member 0 lacks part 3 (its reducer's link to it broke); member 1, first in line, holds it but does
    not relay it; member 2 does. Member 0 ends with the others' average and counts 1 and 3 as gone."""
    def fails(asker, owner, key):
        return asker == 0 and ((owner == 3 and key[2] in ("out", "commit")) or (owner == 1 and key[2:] == ("out", 3)))

    results = run_group(4, fails=fails)
    assert results[0].repaired_parts == [3] and results[0].gone == [1, 3]
    for result in results:
        assert torch.allclose(result.tensors[0], average_of(range(4)), atol=1e-6)
        assert torch.equal(result.tensors[0], results[0].tensors[0])


def test_a_holder_relays_a_part_without_having_read_the_askers_commit():
    """Member 1 lacks part 3, and neither member 0 nor member 2 gets member 1's commit (say member 1 was
    cut there for being slow): they still relay part 3 to it, since a part is offered as soon as it is
    received. Everyone ends with the same average."""
    def fails(asker, owner, key):
        return (asker == 1 and owner == 3 and key[2] in ("out", "commit")) or (owner == 1 and key[2] == "commit")

    results = run_group(4, fails=fails)
    assert results[1].repaired_parts == [3] and results[1].gone == [3]
    assert results[0].gone == results[2].gone == [1]
    for result in results:
        assert torch.allclose(result.tensors[0], average_of(range(4)), atol=1e-6)
        assert torch.equal(result.tensors[0], results[0].tensors[0])


# ------------------------------------------------------------------------- heartbeats without data

def heartbeats(period: float, then_data: float | None = None):
    """A response stream that heartbeats every ``period`` seconds, then after ``then_data`` seconds
    (never, if None) sends one small tensor."""
    async def stream():
        started = time.monotonic()
        while then_data is None or time.monotonic() - started < then_data:
            yield wire.response(**wire.HEARTBEAT)
            await asyncio.sleep(period)
        payload = runtime_pb2.Tensor(buffer=torch.ones(4).numpy().tobytes(), size=[4], dtype="float32", chunks=1)
        for message in wire.tensor_messages([payload], note="data"):
            yield message
    return stream()


def read(stream, patience: float):
    return asyncio.run(wire.read_tensor_messages(stream, max_bytes=1 << 10, patience=patience))


def test_heartbeats_alone_are_cut_at_the_patience():
    """Before issue 11 a reader skipped heartbeats without limit: a peer that heartbeats but never
    delivers held it until the round's timeout."""
    started = time.monotonic()
    with pytest.raises(wire.Stalled):
        read(heartbeats(0.05), patience=0.5)
    assert 0.5 <= time.monotonic() - started < 4.0  # cut at the patience, not at a round's timeout (generous: CI is loaded)


def test_a_slow_heartbeat_does_not_stretch_the_patience():
    started = time.monotonic()
    with pytest.raises(wire.Stalled):
        read(heartbeats(5.0), patience=0.5)
    assert time.monotonic() - started < 4.0  # before the first 5 s heartbeat could have reset anything


def test_data_within_the_patience_is_read():
    header, payloads = read(heartbeats(0.05, then_data=0.3), patience=1.0)
    assert header == {"count": 1, "note": "data"} and len(payloads) == 1
