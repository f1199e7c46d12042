"""``averaging.mode: diloco``: many local steps, then one averaged outer step per round.

Each peer runs its inner optimizer (AdamW) on its own data. When the swarm has processed the round's
sample budget (``diloco.inner_steps`` x batch size x peers, or ``diloco.round_samples``), or the
round's deadline passes, peers form a group and average their pseudo-gradients (parameters at the
start of the round minus local parameters), weighted by the samples each processed. Every member
applies the same outer step (SGD with Nesterov momentum) to the same starting parameters, so all
members end the round with identical parameters and identical outer optimizer state.

Agreement is checked, not assumed: after every round each peer publishes a hash of its outer state;
a peer whose state is not the one the swarm agrees on (see :func:`swarm.rounds.choose_donor`)
downloads that state. This is how late joiners start, how a peer that missed a round catches up,
and how two halves of a partitioned swarm become one again.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_logger

from swarm.averaging.group import Group, RoundMissed
from swarm.averaging.service import AveragingService
from swarm.collaboration import Collaboration, Counters, SwarmView
from swarm.compression_plan import CompressionPlan
from swarm.config import AveragingConfig, DiLoCoConfig
from swarm.rounds import RoundTracker, StateRecord, choose_donor, in_agreement, state_digest

logger = get_logger(__name__)


class DiLoCo(Collaboration):
    """:param inner_optimizer: callable(params) -> the local optimizer (AdamW, or 8-bit AdamW).
    :param batch_size: samples per local step, for the default round budget."""

    def __init__(self, *, model: torch.nn.Module, dht: hivemind.DHT, run_id: str, role: str,
                 inner_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
                 config: DiLoCoConfig, averaging: AveragingConfig, batch_size: int):
        self.config, self.averaging, self.batch_size, self.role = config, averaging, batch_size, role
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inner = inner_optimizer(self.params)
        self.outer_params = [p.detach().to("cpu", torch.float32).clone() for p in self.params]
        self.outer = torch.optim.SGD(self.outer_params, lr=config.outer_lr, momentum=config.outer_momentum, nesterov=True)
        for p in self.outer_params:  # explicit buffers: part of the state that peers share
            self.outer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.compression = CompressionPlan(averaging)
        self.round, self.total_samples = 0, 0
        self._round_samples, self._round_started = 0, time.monotonic()
        self._counters = Counters()
        self._shared: Optional[tuple[dict, list[torch.Tensor]]] = None

        self.service = AveragingService(
            dht=dht, run_id=run_id, chunk_timeout=averaging.chunk_timeout, request_timeout=averaging.request_timeout,
        ).start()
        self.service.state_provider = lambda: self._shared
        self.tracker = RoundTracker(dht=dht, run_id=run_id, refresh_period=config.refresh_period)
        self._publish_state()
        self.tracker.start()
        self._sync_with_swarm()  # a late joiner starts from the swarm's state, not from scratch

    # ---- Collaboration ------------------------------------------------------------------
    @property
    def local_epoch(self) -> int:
        return self.round

    def step(self, batch_size: int) -> None:
        self._sync_with_swarm()
        self.inner.step()
        self._round_samples += batch_size
        self.tracker.report(self.round, self._round_samples)
        if self._round_closed():
            self._finish_round()

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def swarm_view(self) -> SwarmView:
        return SwarmView(num_peers=self.tracker.num_peers(), epoch=max(self.tracker.rounds_of_peers().values(), default=self.round))

    def epochs_of_peers(self) -> dict[str, int]:
        return self.tracker.rounds_of_peers()

    def prefer_as_state_donor(self) -> None:
        pass  # the role travels in the state record; choose_donor prefers institutions

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "total_samples": self.total_samples,
            "outer_params": [p.clone() for p in self.outer_params],
            "momentum": [self.outer.state[p]["momentum_buffer"].clone() for p in self.outer_params],
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; the model's own (local) parameters come from the checkpoint's model."""
        self._adopt(state["round"], state["total_samples"], state["outer_params"], state["momentum"], keep_local=True)
        self.inner.load_state_dict(state["inner"])
        self._start_round()
        self._publish_state()

    def counters(self) -> Counters:
        shared = self._shared[0] if self._shared is not None else {}
        self._counters.extra = {"state_hash": shared.get("hash", "")[:16], "total_samples": self.total_samples,
                                "residual_norm": round(self.compression.residual_norm(), 6)}
        return self._counters

    def finish(self, stop, deadline: float) -> bool:
        """Keep serving and comparing states until every peer still in the run holds this one's: a
        peer whose last round failed adopts the swarm's state here, as it would have at its next step."""
        while True:
            self._sync_with_swarm()
            if in_agreement(self.tracker.me, self.tracker.states(), self.tracker.rounds_of_peers()):
                return True
            if stop.wait(0.5) or time.monotonic() >= deadline:
                logger.warning("leaving before the swarm agreed on one final model")
                return False

    def shutdown(self) -> None:
        self.tracker.shutdown()
        self.service.shutdown()

    # ---- rounds --------------------------------------------------------------------------
    def _round_closed(self) -> bool:
        expected = self.tracker.expected(self.round)
        budget = self.config.round_samples or self.config.inner_steps * self.batch_size * len(expected)
        swarm_samples = max(self.tracker.swarm_samples(self.round), self._round_samples)
        return swarm_samples >= budget or time.monotonic() - self._round_started >= self.config.round_timeout

    def _finish_round(self) -> None:
        deltas = [outer - local.detach().to("cpu", torch.float32) for outer, local in zip(self.outer_params, self.params)]
        weight, group = float(self._round_samples), None
        if not all(torch.isfinite(d).all() for d in deltas):
            self._counters.nonfinite_updates += 1  # the all-reduce makes this peer abstain; logged there
        try:
            group = self.service.form_group(
                self.round, weight=weight, expected=lambda: self.tracker.expected(self.round),
                timeout=self.averaging.averaging_timeout,
            )
            averaged, total = self._average(group, deltas, weight), int(group.total_weight)
            if group.size > 1:
                self._counters.rounds_ok += 1
        except (RoundMissed, TimeoutError) as e:
            logger.warning(f"round {self.round}: averaging failed ({e}); applying this peer's own update, "
                           f"to be replaced by the swarm's state if it differs")
            self._counters.rounds_failed += 1
            averaged, total = self._alone(deltas), int(weight)
        finally:
            if group is not None:
                self.service.finish_group(group)
        self._outer_step(averaged)
        self.total_samples += total
        self.round += 1
        self._start_round()
        self._publish_state()
        peers = group.size if group is not None else 1
        logger.info(f"round {self.round - 1} done with {peers} peer(s), {total} samples; now round {self.round}")

    def _average(self, group: Group, deltas: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
        if group.size == 1:
            return self._alone(deltas)

        def allreduce(tensors: list[torch.Tensor], phase: int, choose_codec) -> list[torch.Tensor]:
            result = self.service.allreduce(group, tensors, weight=weight, phase=phase, choose_codec=choose_codec,
                                            timeout=self.averaging.averaging_timeout)
            self._counters.refused_inputs += result.refused_inputs
            self._counters.dropped_parts += len(result.missing_parts)
            self._counters.bytes_received += result.bytes_received
            self._counters.bytes_sent += result.bytes_sent
            return result.tensors, result.sent

        return self.compression.average(deltas, allreduce)

    def _alone(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """A swarm of one (or a peer cut off): its own update, minus anything non-finite."""
        if not all(torch.isfinite(d).all() for d in deltas):
            logger.warning(f"round {self.round}: this peer's update holds NaN/Inf; skipping it")
            return [torch.zeros_like(d) for d in deltas]
        self.compression.forget_residuals()
        return deltas

    def _outer_step(self, averaged: list[torch.Tensor]) -> None:
        for param, grad in zip(self.outer_params, averaged):
            param.grad = grad.to(param.dtype)
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for local, outer in zip(self.params, self.outer_params):
                local.copy_(outer.to(local.device, local.dtype))

    def _start_round(self) -> None:
        self._round_samples, self._round_started = 0, time.monotonic()
        self.tracker.report(self.round, 0)

    # ---- agreement -----------------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        return self.outer_params + [self.outer.state[p]["momentum_buffer"] for p in self.outer_params]

    def _publish_state(self) -> None:
        digest = state_digest(self.round, self.total_samples, self._state_tensors())
        self._shared = ({"round": self.round, "total": self.total_samples, "hash": digest},
                        [t.clone() for t in self._state_tensors()])
        self.tracker.publish_state(StateRecord(self.round, self.total_samples, digest, self.role))

    def _sync_with_swarm(self) -> None:
        donor = choose_donor(self.tracker.me, self.tracker.states())
        if donor is None:
            return
        peer, record = donor
        try:
            header, tensors = self.service.download_state(PeerID.from_base58(peer), timeout=self.averaging.load_state_timeout)
            expected = len(self.outer_params)
            if len(tensors) != 2 * expected or any(t.shape != p.shape for t, p in zip(tensors, self._state_tensors())):
                raise ValueError("the state does not match this model")
            if state_digest(header["round"], header["total"], tensors) != header["hash"]:
                raise ValueError("the state does not match its hash")
        except Exception as e:  # any failure leaves our state as it is; we try again at the next step
            logger.warning(f"could not download the swarm's state from {peer[-6:]}: {e!r}")
            return
        previous = self.round
        self._adopt(int(header["round"]), int(header["total"]), tensors[:expected], tensors[expected:])
        self._start_round()
        self._publish_state()
        self._counters.state_downloads += 1
        logger.info(f"adopted the swarm's state from {peer[-6:]}: round {previous} -> {self.round}, "
                    f"{self.total_samples} samples seen")

    def _adopt(self, round_number: int, total: int, outer_params: list[torch.Tensor], momentum: list[torch.Tensor],
               keep_local: bool = False) -> None:
        with torch.no_grad():
            for param, value, buffer in zip(self.outer_params, outer_params, momentum):
                param.copy_(value)
                self.outer.state[param]["momentum_buffer"].copy_(buffer)
            if not keep_local:
                for local, outer in zip(self.params, self.outer_params):
                    local.copy_(outer.to(local.device, local.dtype))
        self.round, self.total_samples = round_number, total
        self.compression.forget_residuals()

