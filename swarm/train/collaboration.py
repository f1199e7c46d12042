"""How a trainer's local steps become one shared model.

Two implementations share this interface: :class:`swarm.train.sync.HivemindSync` (``averaging.mode:
sync``: hivemind.Optimizer averages gradients every swarm epoch) and :class:`swarm.train.diloco.DiLoCo`
(``averaging.mode: diloco``: local steps, then pseudo-gradients averaged once per round). The
training loop only talks to this interface; "epoch" means a swarm epoch in sync mode and a round in
DiLoCo mode.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

from swarm.averaging.counters import Counters


@dataclass
class SwarmView:
    """What this peer knows of the swarm's progress; the last three are None where unknown."""

    num_peers: int
    epoch: int
    samples: Optional[int] = None  # samples the swarm has gathered towards the next epoch or round
    target: Optional[int] = None  # samples that close it
    eta: Optional[float] = None  # estimated seconds until it closes


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

    def communication_seconds(self) -> Optional[float]:
        """Seconds :meth:`step` has spent so far on anything but the local optimizer step: averaging,
        waiting for it, state checks and downloads. None: not measured (sync mode, where one call of
        hivemind's optimizer does both)."""
        return None

    def check(self) -> None:
        """:raises BackgroundError: one of this collaboration's own background threads died. Called
        from the trainer's loop; hivemind's optimizer (sync mode) runs and watches its own."""

    @abstractmethod
    def shutdown(self) -> None: ...
