"""The local training loop of a trainer peer, around a collaborative optimizer.

Each local step samples a batch from this peer's shard, backpropagates, and calls the collaboration's
``step()`` (see :mod:`swarm.train.collaboration`), which decides when the swarm advances. The loop
evaluates held-out loss at every epoch change, saves checkpoints periodically, and reports a
:class:`TrainingStatus` to a callback so the entry point can show or publish it.

Utilization is the fraction of the training's wall time (from the first local step to the last, the
wait for the others at the end not counted) spent computing local steps: forward, backward and the
local optimizer step, not the time the collaboration's ``step()`` spent averaging, waiting for an
average or checking and downloading state (:meth:`Collaboration.communication_seconds`), nor held-out
evaluations, checkpoints and status updates. ``TrainingStatus.time_split`` shows where the rest went.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from hivemind.utils import get_logger

from swarm.config.schema import TrainingConfig
from swarm.train.collaboration import Collaboration
from swarm.train.data import TextDataset
from swarm.train.fit import autocast

logger = get_logger(__name__)


@dataclass
class TrainingStatus:
    """What a trainer knows about itself and the swarm; JSON-serializable via :meth:`as_dict`."""

    peer_id: str
    role: str
    epoch: int = 0
    start_epoch: int = 0
    steps: int = 0
    samples: int = 0
    samples_per_second: float = 0.0
    train_loss: Optional[float] = None
    heldout_loss: Optional[float] = None
    initial_heldout_loss: Optional[float] = None
    swarm_peers: int = 1
    swarm_epoch: int = 0
    round_samples: Optional[int] = None  # samples the swarm has gathered towards the next epoch or round
    round_target: Optional[int] = None  # samples that close it
    next_round_at: Optional[float] = None  # estimated wall-clock time it closes (time.time())
    averaging: dict = field(default_factory=dict)  # the collaboration's Counters: rounds, bytes, faults
    last_checkpoint_hash: Optional[str] = None
    resumed_state_hash: Optional[str] = None
    started_at: float = 0.0
    updated_at: float = 0.0
    finished: bool = False
    # fraction of the training's wall time spent in local steps (see the module docstring); None: not measured
    utilization: Optional[float] = None
    time_split: dict = field(default_factory=dict)  # seconds: wall, steps, communication, evaluation

    def as_dict(self) -> dict:
        return asdict(self)


class TrainingLoop:
    """Runs local steps until ``stop`` is set or the swarm reaches ``training.max_epochs``.

    :param save_checkpoint: callable that writes a checkpoint and returns its state hash;
      called every ``checkpoint_every`` epochs (None: no periodic checkpoints).
    :param on_status: receives the status at most every ``status_period`` seconds and at every epoch.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        opt: Collaboration,
        dataset: TextDataset,
        config: TrainingConfig,
        seq_len: int,
        device: torch.device,
        status: TrainingStatus,
        grad_clip: Optional[float] = None,
        prefer_as_donor: bool = False,
        save_checkpoint: Optional[Callable[[], str]] = None,
        checkpoint_every: Optional[int] = None,
        on_status: Optional[Callable[[TrainingStatus], None]] = None,
        status_period: float = 1.0,
    ):
        self.model, self.opt, self.dataset, self.config = model, opt, dataset, config
        self.seq_len, self.device, self.status, self.grad_clip = seq_len, device, status, grad_clip
        self.prefer_as_donor = prefer_as_donor
        self.save_checkpoint, self.checkpoint_every = save_checkpoint, checkpoint_every
        self.on_status, self.status_period = on_status or (lambda status: None), status_period
        # a different stream of samples on every peer, reproducible for a given peer id and seed
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(status.peer_id.encode()))
        self.heldout = dataset.heldout_batches(config.eval_batches, config.batch_size, seq_len)
        self._clock = {"started": None, "steps": 0.0, "evaluation": 0.0}  # the training's wall time, for utilization

    def run(self, stop: threading.Event) -> TrainingStatus:
        status = self.status
        status.started_at = time.time()
        status.epoch = status.start_epoch = self.opt.local_epoch
        status.initial_heldout_loss = status.heldout_loss = self.evaluate()
        logger.info(f"start at epoch {status.epoch}, held-out loss {status.heldout_loss:.3f}")
        self._publish(force=True)
        last_step_end = self._clock["started"] = time.perf_counter()
        while not stop.is_set() and not self.reached_max_epochs():
            step_started = time.perf_counter()
            loss = self.local_step()
            now = time.perf_counter()
            self._clock["steps"] += now - step_started
            self._update_speed(now - last_step_end)
            last_step_end = now
            status.train_loss = loss if status.train_loss is None else 0.9 * status.train_loss + 0.1 * loss
            if self.prefer_as_donor:
                self.opt.prefer_as_state_donor()
            if self.opt.local_epoch != status.epoch:
                self._on_new_epoch()
            self._publish(force=False)
        self._update_utilization()
        self._clock["started"] = None  # what follows (waiting for the others, settling) is not training
        if self.reached_max_epochs():
            deadline = time.monotonic() + self.config.finish_timeout
            self._wait_for_stragglers(stop, deadline)
            if self.opt.finish(stop, deadline):
                logger.info("every peer still in the run holds this peer's final model")
        status.heldout_loss = self.evaluate()
        status.finished = True
        self._publish(force=True)
        return status

    def _wait_for_stragglers(self, stop: threading.Event, deadline: float) -> None:
        """Stay in the swarm (serving state, not training) until every peer has reached the last epoch
        or the deadline passes: a peer one round behind catches up by downloading the final state,
        which only works while someone who has it is still there. Then :meth:`Collaboration.finish`
        settles the finished peers on one final model, within the same deadline."""
        announced = False
        while True:
            behind = {peer: epoch for peer, epoch in self.opt.epochs_of_peers().items() if epoch < self.config.max_epochs}
            if not behind:
                return
            if not announced:
                logger.info(f"reached epoch {self.config.max_epochs}; waiting for {len(behind)} peer(s) to catch up")
                announced = True
            if time.monotonic() >= deadline:
                break
            if stop.wait(1.0):
                return
        logger.warning(f"some peers are still behind epoch {self.config.max_epochs}: "
                       f"{', '.join(f'{peer[-6:]} at {epoch}' for peer, epoch in sorted(behind.items()))}")

    def reached_max_epochs(self) -> bool:
        return self.config.max_epochs is not None and self.opt.local_epoch >= self.config.max_epochs

    def local_step(self) -> float:
        self.model.train()
        inputs, targets = self.dataset.sample_batch(self.config.batch_size, self.seq_len, self.generator)
        with autocast(self.device, self.config.precision):
            loss = self.model.loss(inputs.to(self.device), targets.to(self.device))
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step(self.config.batch_size)
        self.opt.zero_grad()
        self.status.steps += 1
        self.status.samples += self.config.batch_size
        return float(loss.item())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed held-out batches."""
        self.model.eval()
        with autocast(self.device, self.config.precision):
            losses = [self.model.loss(x.to(self.device), y.to(self.device)).item() for x, y in self.heldout]
        return float(sum(losses) / len(losses))

    def _on_new_epoch(self) -> None:
        status = self.status
        if self.opt.local_epoch > status.epoch + 1:
            logger.info(f"caught up with the swarm: epoch {status.epoch} -> {self.opt.local_epoch} (state from peers)")
        status.epoch = self.opt.local_epoch
        started = time.perf_counter()
        status.heldout_loss = self.evaluate()
        self._clock["evaluation"] += time.perf_counter() - started
        if not math.isfinite(status.heldout_loss):
            logger.warning(f"held-out loss is {status.heldout_loss} at epoch {status.epoch}")
        if self.save_checkpoint is not None and self.checkpoint_every and status.epoch % self.checkpoint_every == 0:
            status.last_checkpoint_hash = self.save_checkpoint()
        logger.info(
            f"epoch {status.epoch}: train loss {status.train_loss:.3f}, held-out {status.heldout_loss:.3f}, "
            f"{status.samples_per_second:.0f} samples/s, {status.swarm_peers} peers"
        )
        self._publish(force=True)

    def _update_speed(self, step_seconds: float) -> None:
        speed = self.config.batch_size / max(step_seconds, 1e-6)
        previous = self.status.samples_per_second
        self.status.samples_per_second = speed if previous == 0 else 0.9 * previous + 0.1 * speed

    def _update_utilization(self) -> None:
        started, communication = self._clock["started"], self.opt.communication_seconds()
        if started is None or communication is None:
            return
        wall = time.perf_counter() - started
        steps = self._clock["steps"] - communication
        self.status.time_split = {"wall": round(wall, 3), "steps": round(steps, 3), "communication": round(communication, 3),
                                  "evaluation": round(self._clock["evaluation"], 3)}
        self.status.utilization = round(steps / wall, 4) if wall > 0 else None

    def _publish(self, *, force: bool) -> None:
        now = time.time()
        if not force and now - self.status.updated_at < self.status_period:
            return
        self._update_utilization()
        view = self.opt.swarm_view()
        self.status.swarm_peers, self.status.swarm_epoch = view.num_peers, view.epoch
        self.status.round_samples, self.status.round_target = view.samples, view.target
        self.status.next_round_at = now + view.eta if view.eta is not None else None
        self.status.averaging = asdict(self.opt.counters())
        self.status.updated_at = now
        self.on_status(self.status)
