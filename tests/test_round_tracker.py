"""The DiLoCo round tracker's view of who takes part: heartbeats judged against this peer's own reads.

A read that reaches only some of the DHT nodes (one of them unreachable) must not make the peers it
missed look gone, or the next round splits into groups of one; a slow DHT must not either. The
tracker runs on a real single-node DHT; the reads are hivemind's own record types.
"""

from __future__ import annotations

import hivemind
import pytest
from hivemind.utils import ValueWithExpiration, get_dht_time

from swarm.net import keys
from swarm.net.diloco_records import Progress, encode_record
from swarm.train.rounds import NETWORK_READ_PERIODS, RoundTracker

PEERS = ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN")


@pytest.fixture(scope="module")
def dht():
    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def read_of(*records: tuple[str, int, float]) -> ValueWithExpiration:
    """A read of the progress key as hivemind returns it: (peer, round, heartbeat time) per subkey."""
    return ValueWithExpiration({peer: ValueWithExpiration([[round_number, 10, beat], [round_number, 100, "h", "volunteer"]],
                                                          beat + keys.DILOCO_TTL)
                                for peer, round_number, beat in records}, get_dht_time() + keys.DILOCO_TTL)


def test_a_read_that_misses_a_peer_does_not_drop_it(dht):
    tracker = RoundTracker(dht=dht, run_id="tracker-test", refresh_period=0.5)
    now = get_dht_time()
    tracker._merge(read_of((PEERS[0], 3, now), (PEERS[1], 3, now)))
    tracker._read_at = now
    assert tracker.rounds_of_peers() == {PEERS[0]: 3, PEERS[1]: 3}
    tracker._merge(read_of((PEERS[0], 4, now + 1)))  # the node holding the other record did not answer
    assert tracker.rounds_of_peers() == {PEERS[0]: 4, PEERS[1]: 3}
    assert set(tracker.states()) == set(PEERS)
    tracker._merge(read_of((PEERS[0], 2, now - 5)))  # an older copy of a record never replaces a newer one
    assert tracker.rounds_of_peers()[PEERS[0]] == 4


def test_silence_counts_only_against_this_peers_own_reads(dht):
    tracker = RoundTracker(dht=dht, run_id="tracker-test", refresh_period=0.5)
    beat = get_dht_time() - 8  # the last heartbeat of PEERS[0] is 8 s old
    tracker._merge(read_of((PEERS[0], 1, beat)))
    tracker._read_at = beat + 1  # ...but this peer has not completed a read since just after it
    assert PEERS[0] in tracker.rounds_of_peers(), "silence while this peer's own reads fail is no evidence"
    tracker._read_at = get_dht_time()
    assert PEERS[0] not in tracker.rounds_of_peers(), "8 s without a heartbeat, seen by a fresh read: gone"
    tracker._count_cycle(get_dht_time(), 3.0)  # each DHT call waits out an unreachable node's timeout:
    assert PEERS[0] in tracker.rounds_of_peers()  # tolerate three such cycles


def test_a_slow_refresh_still_counts_after_a_fast_one(dht):
    """A DHT node just became unreachable: this peer's refresh and the partner's both waited it out
    (6 s). The next refresh is fast again, but the partner's latest record is still the one it stamped
    before its slow refresh; it must not look gone (it did, for half a second, and the next round's
    leader sealed a group of one in that window)."""
    tracker = RoundTracker(dht=dht, run_id="tracker-test", refresh_period=0.5)
    now = get_dht_time()
    tracker._merge(read_of((PEERS[0], 1, now - 6.6)))  # stamped just before the partner's slow refresh
    tracker._count_cycle(now - 0.5, 6.0)  # this peer's own slow refresh, ended half a second ago
    tracker._count_cycle(now, 0.01)  # ... and a fast one since
    tracker._read_at = now
    assert PEERS[0] in tracker.rounds_of_peers()
    tracker._count_cycle(now + 30, 0.01)  # long after, fast refreshes only: silence is evidence again
    assert tracker._tolerance() == 5.0


def test_expired_records_are_forgotten(dht):
    tracker = RoundTracker(dht=dht, run_id="tracker-test", refresh_period=0.5)
    long_ago = get_dht_time() - 2 * keys.DILOCO_TTL
    tracker._merge(read_of((PEERS[0], 1, long_ago), (PEERS[1], 1, get_dht_time())))
    assert PEERS[0] not in tracker.states() and PEERS[1] in tracker.states()


def progress_read(peer: str, round_number: int, samples: int, beat: float) -> ValueWithExpiration:
    return ValueWithExpiration({peer: ValueWithExpiration([[round_number, samples, beat], []], beat + keys.DILOCO_TTL)},
                               get_dht_time() + keys.DILOCO_TTL)


def test_swarm_samples_extrapolate_a_training_peer_by_one_refresh_at_most(dht):
    """A record is up to a refresh old when it is read: summed as it was, every peer saw the swarm
    behind and overshot each round's budget. A peer still training is counted at its rate since it
    stamped its record, never more than one refresh cycle ahead; a peer that stopped is not."""
    tracker = RoundTracker(dht=dht, run_id="tracker-test", refresh_period=1.0)
    now = get_dht_time()
    tracker._merge(progress_read(PEERS[0], 2, 100, now - 3.0))
    tracker._read_at = now
    assert tracker.swarm_samples(2) == 100, "one record of the round: no rate yet"
    tracker._merge(progress_read(PEERS[0], 2, 160, now - 2.0))  # 60 samples/s, stamped 2 s ago
    estimate = tracker.swarm_samples(2)
    assert 160 + 60 * 1.0 <= estimate <= 160 + 60 * 1.5, "one refresh period ahead (plus the refresh time), not two s"
    tracker._merge(progress_read(PEERS[0], 2, 160, now - 1.0))  # it stopped training: averaging
    assert tracker.swarm_samples(2) == 160
    tracker._merge(progress_read(PEERS[0], 3, 16, now - 0.5))  # a new round: no rate carried over
    assert tracker.swarm_samples(3) == 16 and tracker.swarm_samples(2) == 0


def test_idle_period_reports_often_only_near_the_round_end(dht):
    """With idle_period (diloco.idle_refresh_period), the tracker refreshes every idle_period until the
    trainer says the round is about to close, and judges heartbeats against the idle period."""
    tracker = RoundTracker(dht=dht, run_id="tracker-test", refresh_period=0.5, idle_period=10.0)
    assert tracker._loop.period == 10.0 and tracker._tolerance() == 30.0
    beat = get_dht_time() - 20  # a partner that reports every 10 s, 20 s ago: still there
    tracker._merge(read_of((PEERS[0], 1, beat)))
    tracker._read_at = get_dht_time()
    assert PEERS[0] in tracker.rounds_of_peers()
    tracker.hurry(True)
    assert tracker._loop.period == 0.5 and tracker._loop._wakeup.is_set(), "near the end: report now, then often"
    tracker.hurry(False)
    assert tracker._loop.period == 10.0
    plain = RoundTracker(dht=dht, run_id="tracker-test", refresh_period=0.5)
    plain.hurry(False)
    assert plain._loop.period == 0.5 and plain._tolerance() == 5.0


def test_between_network_reads_a_node_that_holds_the_records_reads_its_own_copy(dht):
    """Each node holding the key answers a network read with every peer's record. A node that holds it reads
    its own copy, which the others' stores keep current, as long as this peer's own record landed there; it
    asks the network every NETWORK_READ_PERIODS idle periods."""
    tracker = RoundTracker(dht=dht, run_id="held-copy", refresh_period=0.5, idle_period=10.0)
    tracker.report(0, 5)
    began = get_dht_time()
    tracker.refresh()
    next_read = tracker._next_network_read  # set by a read that asked the network, to NETWORK_READ_PERIODS periods on
    assert began + NETWORK_READ_PERIODS * 10.0 - 0.25 <= next_read <= get_dht_time() + NETWORK_READ_PERIODS * 10.0, \
        "the first read asks the network"
    now = get_dht_time()  # a partner's store reaches this node
    assert dht.store(keys.diloco_peers("held-copy"), encode_record(Progress(1, 10, now), None), now + keys.DILOCO_TTL,
                     subkey=PEERS[0])
    tracker.refresh()
    assert tracker._next_network_read == next_read, "before the next network read is due: this node's own copy"
    assert tracker.rounds_of_peers() == {tracker.me: 0, PEERS[0]: 1}
    tracker._next_network_read = get_dht_time()
    tracker.refresh()
    assert tracker._next_network_read > next_read, "then the network again"


def test_a_copy_behind_the_network_is_not_trusted(dht):
    """A network read that finds a record this node's copy lacks, or one newer by more than a refresh cycle:
    some peer's stores go to other nodes, and the next reads ask the network too."""
    tracker = RoundTracker(dht=dht, run_id="held-copy", refresh_period=0.5, idle_period=10.0)
    now = get_dht_time()
    held = read_of((PEERS[0], 1, now - 3))
    assert not tracker._held_is_behind(held, read_of((PEERS[0], 1, now - 3)), now)
    assert not tracker._held_is_behind(held, read_of((PEERS[0], 1, now - 2.8)), now), "a store still on its way"
    assert tracker._held_is_behind(held, read_of((PEERS[0], 1, now)), now), "three refreshes newer"
    assert tracker._held_is_behind(held, read_of((PEERS[0], 1, now - 3), (PEERS[1], 1, now - 3)), now), "a peer missing"
    tracker._holder, tracker._next_network_read = True, now  # as set by a read that found the copy behind
    assert tracker._network_read_due(now + 0.5)
    tracker._next_network_read = now + 29.75
    assert not tracker._network_read_due(now + 0.5) and tracker._network_read_due(now + 30)
    tracker._holder = False
    assert tracker._network_read_due(now + 0.5), "not a node holding the key: every read asks the network"
