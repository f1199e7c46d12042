"""What the swarm is doing, as far as DiLoCo needs to know: a background reporter and reader.
(Sync-mode peers use the state records too, to settle on one final model, see :mod:`swarm.final_state`.)

Every ``refresh_period`` seconds the tracker stores this peer's record, its progress (round, samples
so far) and its state (round, total samples, state hash, role), and reads everyone else's. The
trainer's thread reads the latest snapshot without waiting on the network.

A progress record doubles as a heartbeat: a peer whose record has not been renewed for a while is
taken for gone. "A while" is measured against this peer's own reads, not the wall clock: when the DHT
is slow (a node of it unreachable, so every lookup waits out a timeout) or a read fails, silence is
not evidence, and a peer that is merely hard to reach must not be dropped from the next round.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Iterable, Optional

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time, get_logger

from swarm import keys

logger = get_logger(__name__)


@dataclass(frozen=True)
class Progress:
    round: int
    samples: int
    time: float


@dataclass(frozen=True)
class StateRecord:
    """A peer's outer state: ``total`` is the number of samples the state has seen (same on every peer
    that holds it), ``hash`` a digest of its tensors."""

    round: int
    total: int
    hash: str
    role: str = "volunteer"


class RoundTracker:
    def __init__(self, *, dht: hivemind.DHT, run_id: str, refresh_period: float):
        self.dht, self.run_id, self.refresh_period = dht, run_id, refresh_period
        self.peer_id: PeerID = dht.peer_id
        self.me = self.peer_id.to_base58()
        self._lock = threading.Lock()
        self._mine: Optional[Progress] = None
        self._my_state: Optional[StateRecord] = None
        self._progress: dict[str, Progress] = {}
        self._states: dict[str, StateRecord] = {}
        self._expires: dict[str, float] = {}  # peer -> when its record, as last seen, expires in the DHT
        self._read_at = get_dht_time()  # when the last read that completed began
        self._cycle_started: Optional[float] = None  # when the refresh in flight began
        self._cycle = 0.0  # how long the last refresh took (seconds)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="round-tracker", daemon=True)

    # ---- called by the trainer ---------------------------------------------------------------
    def start(self) -> "RoundTracker":
        self.refresh()
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def report(self, round_number: int, samples: int) -> None:
        with self._lock:
            self._mine = Progress(round_number, samples, get_dht_time())

    def publish_state(self, record: StateRecord) -> None:
        """Set this peer's state record and push it out now (not at the next period)."""
        with self._lock:
            self._my_state = record
        self._wake.set()

    def swarm_samples(self, round_number: int) -> int:
        with self._lock:
            others = sum(p.samples for peer, p in self._fresh_progress().items() if p.round == round_number and peer != self.me)
            mine = self._mine.samples if self._mine is not None and self._mine.round == round_number else 0
        return others + mine

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
        whose DHT calls take as long as this peer's (the slower of the last refresh and the one in
        flight), and never under 5 s."""
        now = get_dht_time()
        cycle = max(self._cycle, now - self._cycle_started if self._cycle_started is not None else 0.0)
        return max(5.0, 3 * (self.refresh_period + cycle))

    def _fresh_progress(self) -> dict[str, Progress]:
        horizon = min(get_dht_time(), self._read_at) - self._tolerance()
        return {peer: p for peer, p in self._progress.items() if p.time >= horizon}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_period)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception as e:  # the DHT can fail transiently; report and go on (counted in logs)
                logger.warning(f"could not refresh swarm progress: {e!r}")

    def refresh(self) -> None:
        """Store this peer's record and read everyone's: one store and one get (blocking DHT calls).
        Progress and state share one record so that the control traffic stays small next to the
        averaged tensors (it is what dominates bytes per sample for small models)."""
        with self._lock:
            mine, my_state = self._mine, self._my_state
            self._cycle_started = now = get_dht_time()
        try:
            stored = None
            if mine is not None or my_state is not None:  # stamped now: the record doubles as a heartbeat
                progress = [mine.round, mine.samples, now] if mine is not None else []
                state = [my_state.round, my_state.total, my_state.hash, my_state.role] if my_state is not None else []
                stored = self.dht.store(keys.diloco_peers(self.run_id), [progress, state], now + keys.DILOCO_TTL,
                                        subkey=self.me, return_future=True)
            found = self.dht.get(keys.diloco_peers(self.run_id), latest=True)  # while the store is under way
            if stored is not None:
                stored.result()
        finally:
            with self._lock:
                self._cycle, self._cycle_started = get_dht_time() - now, None
        if found is None:  # nothing reachable answered: no news, and no evidence that anyone left
            return
        with self._lock:
            self._merge(found)
            self._read_at = now

    def _merge(self, found) -> None:
        """Take in the records of a read. A read may reach only some of the nodes holding the key (the
        others unreachable), so a peer missing from it keeps its last known record until that expires."""
        if isinstance(found.value, dict):
            for subkey, item in found.value.items():
                peer, value, expires = str(subkey), getattr(item, "value", None), getattr(item, "expiration_time", 0.0)
                if not _pair(value) or not isinstance(expires, (int, float)) or expires < self._expires.get(peer, 0.0):
                    continue
                self._expires[peer] = float(expires)
                for table, parsed in ((self._progress, _progress_of(value[0])), (self._states, _state_of(value[1]))):
                    if parsed is None:
                        table.pop(peer, None)
                    else:
                        table[peer] = parsed
        now = get_dht_time()
        for peer in [peer for peer, expires in self._expires.items() if expires < now]:
            del self._expires[peer]
            self._progress.pop(peer, None)
            self._states.pop(peer, None)


def _pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2


def _progress_of(value) -> Optional[Progress]:
    if (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], int) and isinstance(value[1], int)
            and isinstance(value[2], (int, float)) and value[0] >= 0 and value[1] >= 0):
        return Progress(int(value[0]), int(value[1]), float(value[2]))
    return None


def _state_of(value) -> Optional[StateRecord]:
    if (isinstance(value, (list, tuple)) and len(value) == 4 and isinstance(value[0], int) and isinstance(value[1], int)
            and isinstance(value[2], str) and len(value[2]) <= 128 and isinstance(value[3], str)):
        return StateRecord(int(value[0]), int(value[1]), value[2], value[3][:32])
    return None


def choose_donor(me: str, states: dict[str, StateRecord]) -> Optional[tuple[str, StateRecord]]:
    """Which peer's state this peer should adopt, or None if its own is the one the swarm agrees on.

    The agreed state is the one that has seen the most samples; ties go to the state held by more
    peers, then to the smaller hash. Every peer with the same view reaches the same answer, so a split
    swarm (after a fault or a partition) converges on one state. Among the holders of that state,
    institutions are preferred as donors.
    """
    donors = donors_of_agreed_state(me, states)
    return (donors[0], states[donors[0]]) if donors else None


def donors_of_agreed_state(me: str, states: dict[str, StateRecord]) -> list[str]:
    """Every holder of the state the swarm agrees on (see :func:`choose_donor`), best donor first;
    empty if this peer holds that state already or has no record."""
    if me not in states:
        return []
    holders: dict[tuple[int, str], list[str]] = {}
    for peer, record in states.items():
        holders.setdefault((record.total, record.hash), []).append(peer)
    best = max(holders, key=lambda state: (state[0], len(holders[state]), _reverse(state[1])))
    mine = states[me]
    if best == (mine.total, mine.hash):
        return []
    return sorted(holders[best], key=lambda peer: (states[peer].role != "institution", peer))


def in_agreement(me: str, states: dict[str, StateRecord], peers: Iterable[str]) -> bool:
    """Whether every one of ``peers`` has published the same state as this peer."""
    mine = states.get(me)
    return mine is not None and all(
        (record := states.get(peer)) is not None and (record.total, record.hash) == (mine.total, mine.hash)
        for peer in peers)


def state_digest(round_number: int, total: int, tensors: list[torch.Tensor], extra: bytes = b"") -> str:
    """A digest of a state: its round, its sample count, ``extra`` (e.g. serialized metadata) and its tensors."""
    digest = hashlib.sha256(f"{round_number}:{total}".encode())
    digest.update(extra)
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _reverse(text: str) -> tuple:
    """Orders strings so that max() picks the smallest."""
    return tuple(-ord(char) for char in text)
