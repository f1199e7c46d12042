"""The end of a run: the peers that finished it settle on one final model.

A sync-mode peer can finish a run holding a slightly different model from the others: hivemind lets
a peer whose last gradient round failed step on its own gradients, and a state-averaging round that
lost a part leaves that part as it was on each peer. During the run the next epoch repairs this;
after the last epoch nothing does. So each finished peer publishes a digest of its state in the
run's state records (:mod:`swarm.rounds`, the records DiLoCo agrees through), a peer whose state is
not the one the swarm agrees on (:func:`swarm.rounds.choose_donor`) downloads that state through the
averaging service, and a peer leaves once every peer still in the run holds the state it holds, or
at the deadline.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_logger

from swarm.averaging.service import AveragingService
from swarm.config import AveragingConfig
from swarm.rounds import RoundTracker, StateRecord, donors_of_agreed_state, in_agreement

logger = get_logger(__name__)

HASH = "hash"  # the header field that carries the served state's digest
REFRESH_PERIOD = 1.0  # seconds between state-record refreshes while settling
POLL_PERIOD = 0.5

State = tuple[dict, list[torch.Tensor]]  # a small header (msgpack-able) and the tensors, as served


class FinalState:
    """How one collaboration shares its state: override all three."""

    def capture(self) -> State:
        """This peer's state now (copies: it is served while the caller goes on)."""
        raise NotImplementedError

    def digest(self, state: State) -> str:
        """A digest of a state, the same on every peer for the same state."""
        raise NotImplementedError

    def adopt(self, state: State) -> None:
        """Make ``state`` this peer's own; raise ValueError, changing nothing, if it does not fit."""
        raise NotImplementedError


def settle_final_state(*, dht: hivemind.DHT, run_id: str, role: str, epoch: int, averaging: AveragingConfig,
                       state: FinalState, peers_in_run: Callable[[], Iterable[str]],
                       stop: threading.Event, deadline: float) -> tuple[bool, int]:
    """Serve and compare this peer's final state until the peers still in the run agree on one.

    :param peers_in_run: ids (base58) of the peers still taking part in the run, this one included.
    :param deadline: a ``time.monotonic()`` value; leaving at it (or when ``stop`` is set) is logged.
    :returns: whether every peer still in the run held this peer's final state when it left, and how
      many times this peer adopted another's state.
    """
    service = AveragingService(dht=dht, run_id=run_id, chunk_timeout=averaging.chunk_timeout,
                               request_timeout=averaging.request_timeout).start()
    tracker = RoundTracker(dht=dht, run_id=run_id, refresh_period=REFRESH_PERIOD)
    shared: list = []
    adopted = 0

    def publish(header: dict, tensors: list[torch.Tensor]) -> None:
        digest = state.digest((header, tensors))
        shared[:] = [({**header, HASH: digest}, tensors)]
        tracker.publish_state(StateRecord(epoch, epoch, digest, role))

    service.state_provider = lambda: shared[0] if shared else None
    try:
        publish(*state.capture())
        tracker.start()
        while True:
            states = {peer: record for peer, record in tracker.states().items() if record.round == epoch}
            donors = donors_of_agreed_state(tracker.me, states)
            if donors:
                adopted += _adopt_from(service, donors, states, state, averaging.load_state_timeout, publish)
            elif in_agreement(tracker.me, states, peers_in_run()):
                return True, adopted
            if stop.wait(POLL_PERIOD) or time.monotonic() >= deadline:
                others = sorted(peer for peer in peers_in_run() if not in_agreement(tracker.me, states, [peer]))
                logger.warning(f"leaving before the swarm agreed on one final model; other or no final state "
                               f"from: {', '.join(peer[-6:] for peer in others)}")
                return False, adopted
    finally:
        tracker.shutdown()
        service.shutdown()


def _adopt_from(service: AveragingService, donors: list[str], states: dict[str, StateRecord], state: FinalState,
                timeout: float, publish) -> bool:
    """Download the agreed state from the first donor that serves it intact, and adopt it; False if none did."""
    for peer in donors:
        try:
            header, tensors = service.download_state(PeerID.from_base58(peer), timeout=timeout)
            if header.get(HASH) != states[peer].hash:
                raise ValueError("the donor serves another state than the one it announced")
            if state.digest((header, tensors)) != header[HASH]:
                raise ValueError("the state does not match its hash")
            state.adopt((header, tensors))
        except Exception as e:  # this donor failed or left; the next holder of the same state may serve it
            logger.warning(f"could not download the final state from {peer[-6:]}: {e!r}")
            continue
        publish(*state.capture())
        logger.info(f"adopted the swarm's final model from {peer[-6:]}")
        return True
    return False
