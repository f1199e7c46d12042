"""State agreement: the peers of a run hold one state, checked, not assumed.

Each peer publishes a digest of its state in its progress record (:mod:`swarm.net.diloco_records`)
and serves the state itself through the averaging service. A peer whose state is not the one the
swarm agrees on (:func:`choose_donor`) downloads that state from a holder, checks it against the
digest the holder announced and the digest of what arrived, and adopts it. DiLoCo does this at every
step (late joiners, a peer that missed a round, the two halves of a partition); sync mode does it
once at the end of a run, where hivemind may have left a peer one local step away from the others
(:meth:`StateAgreement.settle`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Callable, Collection, Iterable, Optional

import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_logger

from swarm.averaging.progress import DownloadWatch
from swarm.averaging.service import AveragingService
from swarm.net.diloco_records import StateRecord
from swarm.train.rounds import RoundTracker

logger = get_logger(__name__)

HASH = "hash"  # the header field that carries the served state's digest
POLL_PERIOD = 0.5  # seconds between checks while settling
STATE_SLACK_BYTES = 1 << 20  # a served state may exceed this peer's own by this much (header, dtype legacy)

State = tuple[dict, list[torch.Tensor]]  # a small header (msgpack-able) and the tensors, as served


class SharedState:
    """What one collaboration shares of itself: override every method."""

    def position(self) -> tuple[int, int]:
        """(round, samples) of the current state, as published in its record."""
        raise NotImplementedError

    def capture(self) -> State:
        """This peer's state now (copies: it is served while the caller goes on)."""
        raise NotImplementedError

    def digest(self, state: State) -> str:
        """A digest of a state, the same on every peer for the same state."""
        raise NotImplementedError

    def adopt(self, state: State) -> None:
        """Make ``state`` this peer's own; raise ValueError, changing nothing, if it does not fit."""
        raise NotImplementedError


class StateAgreement:
    """Publish, compare, download, verify, adopt: one peer's part in agreeing on one state.

    :param service: serves this peer's state to others and downloads theirs.
    :param tracker: carries this peer's state record out and everyone's in.
    :param role: travels in the state record; institutions are preferred as donors.
    :param partners: the peers (base58 ids) this one last averaged with, whose state alone it may adopt
      (:func:`choose_donor`).
    """

    def __init__(self, *, state: SharedState, service: AveragingService, tracker: RoundTracker, role: str,
                 load_state_timeout: float, partners: Callable[[], Iterable[str]] = tuple,
                 watch: Optional[DownloadWatch] = None):
        self.state, self.service, self.tracker, self.role = state, service, tracker, role
        self.partners = partners
        self.load_state_timeout = load_state_timeout
        self.downloads = 0  # states adopted from others
        self.watch = watch or DownloadWatch()  # the download in progress, for progress lines
        self._shared: Optional[State] = None
        service.state_provider = lambda: self._shared

    @property
    def shared_hash(self) -> str:
        return self._shared[0][HASH] if self._shared is not None else ""

    def publish(self) -> None:
        """Serve this peer's current state and announce its digest now."""
        header, tensors = self.state.capture()
        digest = self.state.digest((header, tensors))
        self._shared = ({**header, HASH: digest}, tensors)
        round_number, total = self.state.position()
        self.tracker.publish_state(StateRecord(round_number, total, digest, self.role))

    def states(self, round_number: Optional[int] = None) -> dict[str, StateRecord]:
        """Every known peer's state record (this peer's included), optionally of one round only."""
        states = self.tracker.states()
        return states if round_number is None else {p: r for p, r in states.items() if r.round == round_number}

    def catch_up(self, states: Optional[dict[str, StateRecord]] = None) -> bool:
        """Adopt the agreed state if this peer holds another: from the first donor that serves it
        intact. Returns whether it adopted one; any failure leaves this peer's state as it was."""
        states = self.states() if states is None else states
        donors = donors_of_agreed_state(self.tracker.me, states, set(self.partners()))
        size, max_bytes = _state_bytes(self.state) if donors else (0, 0)
        for peer in donors:
            progress = self.watch.begin(peer[-6:], size)
            try:
                header, tensors = self.service.download_state(PeerID.from_base58(peer), timeout=self.load_state_timeout,
                                                              max_bytes=max_bytes, progress=progress)
                if header.get(HASH) != states[peer].hash:
                    raise ValueError("the donor serves another state than the one it announced")
                if self.state.digest((header, tensors)) != header[HASH]:
                    raise ValueError("the state does not match its hash")
                self.state.adopt((header, tensors))
            except Exception as e:  # this donor failed or left; the next holder of the same state may serve it
                logger.warning(f"could not download the swarm's state from {peer[-6:]}: {e!r}")
                continue
            finally:
                self.watch.end()
            self.downloads += 1
            self.publish()
            logger.info(f"adopted the swarm's state from {peer[-6:]}")
            return True
        return False

    def agreed(self, peers: Iterable[str], states: Optional[dict[str, StateRecord]] = None) -> bool:
        return in_agreement(self.tracker.me, self.states() if states is None else states, peers)

    def settle(self, *, peers_in_run: Callable[[], Iterable[str]], stop: threading.Event, deadline: float,
               round_number: Optional[int] = None) -> bool:
        """Catch up and compare until every peer still in the run holds this peer's state; give up at
        ``deadline`` (``time.monotonic()``) or on ``stop``. Only records of ``round_number`` count
        when it is given. Returns whether the peers agreed."""
        while True:
            states = self.states(round_number)
            if not self.catch_up(states) and self.agreed(peers_in_run(), states):
                return True
            if stop.wait(POLL_PERIOD) or time.monotonic() >= deadline:
                others = sorted(peer for peer in peers_in_run() if not in_agreement(self.tracker.me, states, [peer]))
                logger.warning(f"leaving before the swarm agreed on one final model; other or no state "
                               f"from: {', '.join(peer[-6:] for peer in others)}")
                return False


def _state_bytes(state: SharedState) -> tuple[int, int]:
    """(size, limit): the bytes of this peer's own state, what a download is expected to bring; and the
    most a served state may bring. It has the shapes of this peer's own: anything much larger is refused
    before it is decoded (half-precision tensors may travel as fp32, hivemind's legacy bfloat16 format)."""
    tensors = state.capture()[1]
    return (sum(t.numel() * t.element_size() for t in tensors),
            sum(t.numel() * max(t.element_size(), 4) for t in tensors) + STATE_SLACK_BYTES)


# A state announced by this many peers (distinct signed records) may be adopted whatever this peer holds.
QUORUM = 2
# A state announced by one partner alone may be adopted only this many rounds ahead of this peer's own.
SINGLE_LEAD = 1


def choose_donor(me: str, states: dict[str, StateRecord], partners: Collection[str] = ()) -> Optional[tuple[str, StateRecord]]:
    """Which peer's state this peer should adopt, or None if its own is the one the swarm agrees on.

    The agreed state is, among this peer's own and the states it may adopt, the one that has seen the
    most samples; ties go to the state held by more peers, then to the smaller hash. A state may be
    adopted (:func:`adoptable`) when

    - :data:`QUORUM` peers or more announce it (each record is signed by its peer, so one peer cannot
      announce for two); or
    - one of ``partners`` (the peers this one last averaged with) announces it, this peer's own state
      has no quorum either, and it is at most :data:`SINGLE_LEAD` round ahead (partners whose round
      ended differently, e.g. one of them timed out, still meet); or
    - this peer is fresh (round 0, no samples) and it is the only state other than the initial one
      that anyone announces (newcomers joining a lone trainer).

    A state that this peer alone holds yields to a quorum's state of the same round or a later one,
    whatever their samples: a peer that averaged without the others (it missed their group, or its round
    timed out) counts different samples, and would otherwise keep its own state while the quorum can
    never adopt it. A quorum still behind this peer's round does not move it (the others may not have
    published the round they finished together yet).

    So one peer's claim never makes a peer adopt a state unless that peer averaged with it last round,
    and never makes it jump rounds; a peer needs a second identity to reach the quorum (open runs:
    identities are free; see the README). Every peer with the same view reaches the same answer, so a
    split swarm converges on one state. Among the holders of the agreed state, institutions are
    preferred as donors.
    """
    donors = donors_of_agreed_state(me, states, partners)
    return (donors[0], states[donors[0]]) if donors else None


def adoptable(me: str, candidate: tuple[int, str], holders: dict[tuple[int, str], list[str]],
              states: dict[str, StateRecord], partners: Collection[str] = ()) -> bool:
    """Whether ``me`` may adopt the state ``(total, hash)`` that ``holders[candidate]`` announce (see
    :func:`choose_donor`)."""
    mine = states[me]
    own = (mine.total, mine.hash)
    if candidate == own or len(holders[candidate]) >= QUORUM:
        return True
    if mine.round == 0 and mine.total == 0:  # fresh: the initial state proves nothing, however many hold it
        return len(holders) == 2
    if len(holders[own]) >= QUORUM:
        return False
    return all(peer in partners and states[peer].round <= mine.round + SINGLE_LEAD for peer in holders[candidate])


def donors_of_agreed_state(me: str, states: dict[str, StateRecord], partners: Collection[str] = ()) -> list[str]:
    """Every holder of the state the swarm agrees on (see :func:`choose_donor`), best donor first;
    empty if this peer holds that state already or has no record."""
    if me not in states:
        return []
    holders: dict[tuple[int, str], list[str]] = {}
    for peer, record in states.items():
        holders.setdefault((record.total, record.hash), []).append(peer)
    mine = states[me]
    own = (mine.total, mine.hash)
    candidates = [state for state in holders if adoptable(me, state, holders, states, partners)]
    if len(holders[own]) < QUORUM and any(
            len(holders[state]) >= QUORUM and states[holders[state][0]].round >= mine.round for state in candidates):
        candidates.remove(own)  # a state no one else holds yields to a quorum's of its round (see choose_donor)
    best = max(candidates, key=lambda state: (state[0], len(holders[state]), _reverse(state[1])))
    if best == own:
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
