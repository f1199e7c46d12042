"""How a trainer's local steps become one shared model.

Two implementations share this interface: :class:`swarm.optim.HivemindSync` (``averaging.mode:
sync``: hivemind.Optimizer averages gradients every swarm epoch) and :class:`swarm.diloco.DiLoCo`
(``averaging.mode: diloco``: local steps, then pseudo-gradients averaged once per round). The
training loop only talks to this interface; "epoch" means a swarm epoch in sync mode and a round in
DiLoCo mode.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class SwarmView:
    num_peers: int
    epoch: int


@dataclass
class Counters:
    """Averaging outcomes as seen by this peer, for logs and metrics."""

    rounds_ok: int = 0
    rounds_failed: int = 0  # this peer averaged alone or with local gradients instead of with its group
    nonfinite_updates: int = 0  # rounds in which this peer's own update held NaN/Inf
    refused_inputs: int = 0  # parts from others refused (NaN/Inf, malformed)
    dropped_parts: int = 0  # parts whose reducer failed, dropped by the whole group
    state_downloads: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    extra: dict = field(default_factory=dict)


class Collaboration(ABC):
    @property
    @abstractmethod
    def local_epoch(self) -> int:
        """The swarm epoch (sync) or round (DiLoCo) this peer's parameters belong to."""

    @abstractmethod
    def step(self, batch_size: int) -> None:
        """Call after ``loss.backward()`` on a local batch of ``batch_size`` samples."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def swarm_view(self) -> SwarmView: ...

    @abstractmethod
    def epochs_of_peers(self) -> dict[str, int]:
        """Every known peer's epoch or round, keyed by peer id."""

    @abstractmethod
    def prefer_as_state_donor(self) -> None:
        """Advertise this peer as the preferred source of state for late joiners (institutions)."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def counters(self) -> Counters: ...

    @abstractmethod
    def finish(self, stop: threading.Event, deadline: float) -> bool:
        """At the end of a run, settle on one final model with the peers that finished it, serving
        this peer's state meanwhile; give up at ``deadline`` (``time.monotonic()``) or on ``stop``.
        Returns whether every peer still in the run held this peer's state when it returned."""

    @abstractmethod
    def shutdown(self) -> None: ...


def build_collaboration(*, config, dht, model, private_key=None) -> Collaboration:
    """The collaboration that ``config.averaging.mode`` asks for, around ``model``'s parameters.

    :param config: the whole :class:`swarm.config.SwarmConfig` (each implementation takes its sections).
    :param private_key: the peer's identity key (:mod:`swarm.identity`), for records it signs.
    """
    from swarm.optim import build_collaborative_optimizer, inner_optimizer_factory

    if config.averaging.mode == "diloco":
        from swarm.diloco import DiLoCo

        return DiLoCo(model=model, dht=dht, run_id=config.run_id, role=config.peer.role,
                      inner_optimizer=inner_optimizer_factory(config.optimizer), config=config.diloco,
                      averaging=config.averaging, batch_size=config.training.batch_size)
    return build_collaborative_optimizer(dht=dht, run_id=config.run_id, role=config.peer.role, params=model.parameters(),
                                         optimizer=config.optimizer, training=config.training,
                                         averaging=config.averaging, private_key=private_key)
