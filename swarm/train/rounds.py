"""What the swarm is doing, as far as DiLoCo needs to know: a background reporter and reader.
(Sync-mode peers use the state records too, to settle on one final model, see :mod:`swarm.train.agreement`.)
The record itself (its fields and bounds) is :mod:`swarm.net.diloco_records`.

Every ``refresh_period`` seconds the tracker stores this peer's record, its progress (round, samples
so far) and its state (round, total samples, state hash, role), and reads everyone else's. The
trainer's thread reads the latest snapshot without waiting on the network.

A peer's samples this round are read as of its last record, which is up to a refresh (plus the DHT's
latency) old: summed as they are, every peer saw the swarm behind by that much and trained on past the
round's budget (about a fifth more samples per round in ``swarm demo``, while the peers that had
stopped waited). So a record of a peer still training is extrapolated at the rate its last two records
of the round show, over the time since it was stamped and never further than one refresh cycle ahead
(:meth:`RoundTracker.swarm_samples`): a peer that stopped is overestimated by one cycle at most.

Control traffic: each refresh is a signed store and a read of the one key every peer writes a subkey of.
Both walk the DHT with hivemind's find requests, and every node holding the key answers a find with every
peer's record (about 900 bytes each, nearly all of it the RSA owner tag and signature): counted on every
node of an idle swarm of 3 trainers, a refresh is about 6 finds and 3 stores, 18 KB of DHT messages, 86 % of
them the finds' answers (about 29 KB on the wire). So a refresh costs each peer O(peers) bytes and the swarm
O(peers^2) per period. Two things keep it small:
- ``idle_period`` (``diloco.idle_refresh_period``, 10 s by default): the tracker refreshes every
  ``refresh_period`` only while the round is close to closing (:meth:`RoundTracker.hurry`, called by the
  trainer) and every ``idle_period`` otherwise; a new state is pushed at once either way. Heartbeats and
  extrapolation are then judged against ``idle_period``: a peer gone is noticed up to about three idle
  periods later.
- A peer whose DHT node is one of those that hold the key (its own record, just stored, landed in the node's
  storage; a client never is) reads the node's own copy, which every peer's store updates too
  (:meth:`RoundTracker._held_copy`), and asks the other nodes only every ``NETWORK_READ_PERIODS`` idle
  periods: a refresh then costs a store alone, about half. When such a network read finds a record the
  copy lacks (in a swarm past ``num_replicas`` = 5 DHT nodes, peers can disagree on which nodes are nearest to
  the key, so some stores go elsewhere), every read asks the network until the copy keeps up again
  (:meth:`RoundTracker._held_is_behind`), as every read did before.

A progress record doubles as a heartbeat: a peer whose record has not been renewed for a while is
taken for gone. "A while" is measured against this peer's own reads, not the wall clock: when the DHT
is slow (a node of it unreachable, so every lookup waits out a timeout) or a read fails, silence is
not evidence, and a peer that is merely hard to reach must not be dropped from the next round.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Optional

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm.config.schema import DiLoCoConfig, SwarmConfig
from swarm.hivemind_private import held_value
from swarm.loops import PeriodicLoop
from swarm.net import keys
from swarm.net.admission import Admission
from swarm.net.dht import DHT_CALL_FAILURES
from swarm.net.diloco_records import DEFAULT_BOUNDS, Progress, RecordBounds, StateRecord, encode_record, parse_record
from swarm.net.signed_record import peer_of_subkey


def record_bounds(config: SwarmConfig) -> RecordBounds:
    """What this run's DiLoCo records may claim (:class:`RecordBounds`), from settings every peer of the
    run shares: ``training.max_epochs``, ``diloco.round_timeout`` and ``monitor.max_samples_per_second``."""
    diloco = config.diloco or DiLoCoConfig()
    return RecordBounds.for_run(max_epochs=config.training.max_epochs, round_timeout=diloco.round_timeout,
                                max_samples_per_second=config.monitor.max_samples_per_second)


# A node that holds the progress key reads its own copy, and asks the other nodes at least every this many idle
# periods (every refresh while its copy is behind theirs): the peers whose stores go elsewhere are still seen.
NETWORK_READ_PERIODS = 3


class RoundTracker:
    """Start with :meth:`start` (its first refresh runs in the caller's thread, so an unreachable DHT is
    the caller's error), then read; :meth:`check` raises if the background refresh died; :meth:`shutdown`.

    :param refresh_period: seconds between refreshes (one store and one get). Heartbeats are judged
      against it: a peer is taken for gone after about three missed refreshes (see :meth:`_tolerance`).
    :param idle_period: if set (at least ``refresh_period``), seconds between refreshes while the round
      is far from closing (see :meth:`hurry`); heartbeats are then judged against it. Every peer of a run
      must use the same value (it comes from the run's config).
    :param owner: this peer's ``[owner:<RSA key>]`` tag (:func:`swarm.net.signed_record.owner_tag`):
      its record is stored under it and signed by the DHT; None: under the plain peer id, unsigned
      (accepted only by DHT nodes that check nothing).
    :param bounds: records claiming more are ignored (the DHT nodes refuse them too).
    :param admission: records of peers it refuses are ignored (a revoked peer's linger until they expire),
      and a state record's role is the one the peer's certificate gives (``institution`` needs one);
      None: every record counts and every peer is a volunteer.
    """

    def __init__(self, *, dht: hivemind.DHT, run_id: str, refresh_period: float, owner: Optional[bytes] = None,
                 bounds: RecordBounds = DEFAULT_BOUNDS, admission: Optional[Admission] = None,
                 idle_period: Optional[float] = None):
        self.dht, self.run_id, self.refresh_period = dht, run_id, refresh_period
        self.slowest_period = max(refresh_period, idle_period or refresh_period)  # the longest between refreshes
        self._hurrying = idle_period is None
        self.owner, self.bounds, self.admission = owner, bounds, admission
        self.peer_id: PeerID = dht.peer_id
        self.me = self.peer_id.to_base58()
        self._lock = threading.Lock()
        self._mine: Optional[Progress] = None
        self._my_state: Optional[StateRecord] = None
        self._progress: dict[str, Progress] = {}
        self._rates: dict[str, float] = {}  # peer -> samples per second between its last two records of a round
        self._states: dict[str, StateRecord] = {}
        self._expires: dict[str, float] = {}  # peer -> when its record, as last seen, expires in the DHT
        self._read_at = get_dht_time()  # when the last read that completed began
        self._holder = False  # whether this node held the key at the last refresh (see _held_copy)
        self._next_network_read = float("-inf")  # when a read asks the other DHT nodes again (_network_read_due)
        self._cycle_started: Optional[float] = None  # when the refresh in flight began
        self._cycles: list[tuple[float, float]] = []  # (when it ended, seconds) of the refreshes that still count
        # The DHT fails in many ways (timeouts, a node gone, a daemon error, a call's coroutine destroyed in
        # the DHT process); each is retried at the next period, and the heartbeat tolerance above decides
        # when silence means a peer is gone.
        self._loop = PeriodicLoop(name="round-tracker", iteration=self.refresh, period=self.slowest_period,
                                  startup=self.refresh, retry_on=(Exception, *DHT_CALL_FAILURES))

    # ---- called by the trainer ---------------------------------------------------------------
    def start(self) -> "RoundTracker":
        self._loop.start()
        return self

    def check(self) -> None:
        """:raises BackgroundError: the refresh thread died."""
        self._loop.check()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._loop.shutdown(timeout)

    def report(self, round_number: int, samples: int) -> None:
        with self._lock:
            self._mine = Progress(round_number, samples, get_dht_time())

    def hurry(self, close: bool) -> None:
        """``close``: the round is about to close (refresh every ``refresh_period``, starting now), or not
        (every ``idle_period``). Nothing changes without ``idle_period``."""
        if self._hurrying == close or self.slowest_period == self.refresh_period:
            return
        self._hurrying = close
        self._loop.period = self.refresh_period if close else self.slowest_period
        if close:
            self._loop.wake()

    def publish_state(self, record: StateRecord) -> None:
        """Set this peer's state record and push it out now (not at the next period)."""
        with self._lock:
            self._my_state = record
        self._loop.wake()

    def swarm_samples(self, round_number: int) -> int:
        """Samples of ``round_number`` so far: this peer's own, plus the others' as extrapolated to now
        (see the module's docstring); each other peer's count at most ``bounds.max_round_samples``."""
        with self._lock:
            now = get_dht_time()
            ahead = self.slowest_period + self._recent_cycle(now)  # how stale a record may be by now
            others = sum(min(p.samples + self._rates.get(peer, 0.0) * min(max(0.0, now - p.time), ahead),
                             self.bounds.max_round_samples)
                         for peer, p in self._fresh_progress().items() if p.round == round_number and peer != self.me)
            mine = self._mine.samples if self._mine is not None and self._mine.round == round_number else 0
        return int(others) + mine

    def expected(self, round_number: int) -> set[PeerID]:
        """Peers that will take part in this round: those training it or still finishing an earlier one
        (fresh progress records for a round up to this one), this one included."""
        with self._lock:
            peers = {peer for peer, p in self._fresh_progress().items() if p.round <= round_number}
        result = {self.peer_id}
        for peer in peers:
            try:
                result.add(PeerID.from_base58(peer))
            except Exception:  # a malformed subkey from a broken or hostile peer
                continue
        return result

    def rounds_of_peers(self) -> dict[str, int]:
        with self._lock:
            found = {peer: p.round for peer, p in self._fresh_progress().items()}
            if self._mine is not None:
                found[self.me] = self._mine.round
        return found

    def states(self) -> dict[str, StateRecord]:
        with self._lock:
            states = dict(self._states)
            if self._my_state is not None:
                states[self.me] = self._my_state
        return states

    def num_peers(self) -> int:
        return len(self.rounds_of_peers()) or 1

    # ---- background ------------------------------------------------------------------------------
    def _tolerance(self) -> float:
        """How old a heartbeat may be, as of this peer's last read: three missed refreshes of a peer
        whose DHT calls take as long as this peer's, and never under 5 s. "As long" is the slowest of the
        refresh in flight and of the recent ones that still count (:meth:`_count_cycle`)."""
        return max(5.0, 3 * (self.slowest_period + self._recent_cycle(get_dht_time())))

    def _recent_cycle(self, now: float) -> float:
        """Seconds of the slowest of the refresh in flight and of the recent ones that still count."""
        cycle = now - self._cycle_started if self._cycle_started is not None else 0.0
        return max([cycle] + [seconds for ended, seconds in self._cycles if self._counts(ended, seconds, now)])

    def _counts(self, ended: float, seconds: float, now: float) -> bool:
        return now - ended < 3 * (self.slowest_period + seconds)

    def _count_cycle(self, ended: float, seconds: float) -> None:
        """A refresh counts for as long as the heartbeats it held back may still be the latest seen. When
        a DHT node becomes unreachable, every peer's calls wait out its timeout for a while (a store twice),
        so the others' records come as late as this peer's own; counting only the last refresh, the first
        fast read after a slow one found every partner's record a whole slow refresh old and dropped it
        (the survivors of a member whose link died took each other for gone and split the next round)."""
        self._cycles = [(e, s) for e, s in self._cycles if self._counts(e, s, ended)] + [(ended, seconds)]

    def _fresh_progress(self) -> dict[str, Progress]:
        horizon = min(get_dht_time(), self._read_at) - self._tolerance()
        return {peer: p for peer, p in self._progress.items() if p.time >= horizon}

    def refresh(self) -> None:
        """Store this peer's record and read everyone's: one store and one read (blocking DHT calls), the read
        from this node's own copy when it holds one that can be trusted (:meth:`_network_read_due`).
        Progress and state share one record so that the control traffic stays small next to the
        averaged tensors (it is what dominates bytes per sample for small models)."""
        with self._lock:
            mine, my_state = self._mine, self._my_state
            self._cycle_started = now = get_dht_time()
        key = keys.diloco_peers(self.run_id)
        try:
            stored = found = held = None
            if mine is not None or my_state is not None:  # stamped now: the record doubles as a heartbeat
                progress = Progress(mine.round, mine.samples, now) if mine is not None else None
                expiration = now + keys.DILOCO_TTL
                stored = self.dht.store(key, encode_record(progress, my_state), expiration,
                                        subkey=self.owner or self.me, return_future=True)
            asked = stored is None or self._network_read_due(now)
            if asked:
                found = self.dht.get(key, latest=True)  # (while the store is under way)
            if stored is not None:
                stored.result()
                held = self._held_copy(key, expiration)
                self._holder = held is not None
                if held is None and not asked:  # not (or no longer) one of the nodes holding the key
                    found, asked = self.dht.get(key, latest=True), True
            if asked and found is not None:
                behind = held is not None and self._held_is_behind(held, found, now)
                # a copy that kept up is trusted for a few idle periods; one that fell behind is not, until it keeps up
                self._next_network_read = now + (0.0 if behind else NETWORK_READ_PERIODS * self.slowest_period
                                                  - self.refresh_period / 2)
            found = found if found is not None else held
        finally:
            with self._lock:
                ended = get_dht_time()
                self._count_cycle(ended, ended - now)
                self._cycle_started = None
        if found is None:  # nothing reachable answered: no news, and no evidence that anyone left
            return
        with self._lock:
            self._merge(found)
            self._read_at = now

    def _network_read_due(self, now: float) -> bool:
        """Whether this refresh asks the other DHT nodes: always unless this node held the key at the last
        refresh; else every ``NETWORK_READ_PERIODS`` idle periods, and at every refresh while the last network
        read found this node's copy behind (:meth:`_held_is_behind`)."""
        return not self._holder or now >= self._next_network_read

    def _held_is_behind(self, held, found, now: float) -> bool:
        """Whether a network read found a record that this node's copy (read just after it) lacks, or one newer
        by more than a refresh cycle: some peer's stores go to other nodes (in a swarm past hivemind's 5 replicas
        of a key, peers can disagree on which nodes are nearest to it). A hostile peer can cause this on purpose
        (storing only elsewhere): then every read asks the network, as before the copy was read at all."""
        if not isinstance(found.value, dict) or not isinstance(held.value, dict):
            return False
        slack = self.refresh_period + self._recent_cycle(now)
        for subkey, item in found.value.items():
            expires, copy = getattr(item, "expiration_time", None), held.value.get(subkey)
            if isinstance(expires, (int, float)) and (copy is None or expires > copy.expiration_time + slack):
                return True
        return False

    def _held_copy(self, key: str, expiration: float):
        """This node's own copy of the records, if it is one of the DHT nodes that store them: the record it
        just stored (expiring at ``expiration``) landed here. None if not (then the others' stores do not
        come here either) or if the copy cannot be read."""
        try:
            held = self.dht.run_coroutine(functools.partial(held_value, key=key))
        except Exception:
            return None
        if held is None or not isinstance(held.value, dict):
            return None
        own = held.value.get(self.owner or self.me)
        return held if own is not None and own.expiration_time >= expiration else None

    def _merge(self, found) -> None:
        """Take in the records of a read. A read may reach only some of the nodes holding the key (the
        others unreachable), so a peer missing from it keeps its last known record until that expires."""
        if isinstance(found.value, dict):
            for subkey, item in found.value.items():
                peer, expires = peer_of_subkey(subkey), getattr(item, "expiration_time", 0.0)
                parsed_record = parse_record(getattr(item, "value", None), self.bounds)
                if (peer is None or parsed_record is None or not isinstance(expires, (int, float))
                        or expires < self._expires.get(peer, 0.0)):
                    continue
                if peer != self.me and self.admission is not None and self.admission.refusal(peer) is not None:
                    self._forget(peer)
                    continue
                self._expires[peer] = float(expires)
                progress, state = parsed_record
                self._note_rate(peer, self._progress.get(peer), progress)
                if state is not None and peer != self.me:  # a claimed role counts only with a certificate
                    state = dataclasses.replace(state, role=self.admission.role(peer) if self.admission else "volunteer")
                for table, parsed in zip((self._progress, self._states), (progress, state)):
                    if parsed is None:
                        table.pop(peer, None)
                    else:
                        table[peer] = parsed
        now = get_dht_time()
        for peer in [peer for peer, expires in self._expires.items() if expires < now]:
            self._forget(peer)

    def _note_rate(self, peer: str, before: Optional[Progress], after: Optional[Progress]) -> None:
        """The peer's training rate from two of its records of one round; none (not extrapolated) across
        rounds, and zero once its count stops growing (it is averaging or waiting)."""
        if after is None or before is None or before.round != after.round:
            self._rates.pop(peer, None)
        elif after.time > before.time:  # a read of the same record again changes nothing
            self._rates[peer] = max(0.0, (after.samples - before.samples) / (after.time - before.time))

    def _forget(self, peer: str) -> None:
        self._expires.pop(peer, None)
        self._rates.pop(peer, None)
        self._progress.pop(peer, None)
        self._states.pop(peer, None)
