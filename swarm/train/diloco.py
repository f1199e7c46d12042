"""``averaging.mode: diloco``: many local steps, then one averaged outer step per round.

Each peer runs its inner optimizer (AdamW) on its own data. When the swarm has processed the round's
sample budget (``diloco.inner_steps`` x batch size x peers, or ``diloco.round_samples``), or the
round's deadline passes, peers form a group and average their pseudo-gradients (parameters at the
start of the round minus local parameters), weighted by the samples each processed. Every member
applies the same outer step (SGD with Nesterov momentum) to the same starting parameters, so all
members end the round with identical parameters and identical outer optimizer state.

Agreement is checked, not assumed (:mod:`swarm.train.agreement`): after every round each peer
publishes a hash of its outer state; a peer whose state is not the one the swarm agrees on downloads
that state. This is how late joiners start, how a peer that missed a round catches up, and how two
halves of a partitioned swarm become one again.

With ``diloco.overlap`` a round's all-reduce runs in the background while the next round's inner steps
go on, and its outer step lands one step later, the progress made meanwhile laid on top
(:mod:`swarm.train.overlap`).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import hivemind
import torch
from hivemind.utils import get_logger
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.averager import Averager
from swarm.averaging.counters import Counters
from swarm.averaging.progress import DownloadWatch
from swarm.config.schema import AveragingConfig, DiLoCoConfig
from swarm.net.admission import Admission
from swarm.net.diloco_records import DEFAULT_BOUNDS, RecordBounds
from swarm.net.signed_record import owner_tag
from swarm.train.agreement import SharedState, State, StateAgreement, state_digest
from swarm.train.collaboration import Collaboration, SwarmView
from swarm.train.overlap import InFlight, carry_drift, snapshot
from swarm.train.rounds import RoundTracker

logger = get_logger(__name__)

# With diloco.idle_refresh_period, the tracker reports every refresh_period only over about this many of them
# before the round's estimated end (so 1-2 reports; each costs ~29 KB on the wire with 3 peers). Between them the
# others' counts are extrapolated at their rates; 3 (4-5 reports a round) closed H=200 rounds no closer to the budget.
HURRY_REPORTS = 1.5


class DiLoCo(Collaboration, SharedState):
    """:param inner_optimizer: callable(params) -> the local optimizer (AdamW, or 8-bit AdamW).
    :param batch_size: samples per local step, for the default round budget.
    :param private_key: the peer's identity key: its DiLoCo records are signed with it.
    :param bounds: what other peers' records may claim (:func:`swarm.train.rounds.record_bounds`).
    :param admission: who may take part and as what (:class:`~swarm.net.admission.Admission`): others'
      requests, records and claimed roles go through it; None: anyone may, and no one is an institution.
    :param watch: where state downloads show their progress (:class:`~swarm.averaging.progress.DownloadWatch`).
    :param listen_host: the interface direct links listen on (``network.listen_host``; see ``averaging.direct``)."""

    def __init__(self, *, model: torch.nn.Module, dht: hivemind.DHT, run_id: str, role: str,
                 inner_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
                 config: DiLoCoConfig, averaging: AveragingConfig, batch_size: int,
                 private_key: Optional[RSAPrivateKey] = None, bounds: RecordBounds = DEFAULT_BOUNDS,
                 admission: Optional[Admission] = None, watch: Optional[DownloadWatch] = None,
                 listen_host: Optional[str] = None):
        self.config, self.batch_size = config, batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inner = inner_optimizer(self.params)
        self.outer_params = [p.detach().to("cpu", torch.float32).clone() for p in self.params]
        self.outer = torch.optim.SGD(self.outer_params, lr=config.outer_lr, momentum=config.outer_momentum, nesterov=True)
        for p in self.outer_params:  # explicit buffers: part of the state that peers share
            self.outer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.round, self.total_samples = 0, 0
        self._round_samples, self._round_started = 0, time.monotonic()
        self._check_seconds = 0.0  # spent this round in the per-step state check (logged with the round)
        self._blocked = 0.0  # seconds step() spent on anything but the inner step, since the start
        self._in_flight: Optional[InFlight] = None  # diloco.overlap: the round being averaged in the background
        self._warmup_step: Optional[int] = None  # inner steps since a fresh inner optimizer joined a running swarm
        self._base_lrs: list[float] = []  # the inner learning rates a warm-up ramps up to

        owner = owner_tag(dht, private_key)  # this peer's records are signed under it (swarm.net.diloco_records)
        if owner is None:
            logger.warning("DiLoCo records go unsigned: no identity key for this peer id; nodes that check "
                           "signatures refuse them")
        self.averager = Averager(dht=dht, run_id=run_id, averaging=averaging, owner=owner,
                                 admit=admission.refusal if admission is not None else None,
                                 max_weight=float(bounds.max_round_samples),
                                 private_key=private_key if owner is not None else None, direct_host=listen_host)
        self.averager.plan.warm_up(self.outer_params)  # not in the first round's all-reduce
        self.tracker = RoundTracker(dht=dht, run_id=run_id, refresh_period=config.refresh_period, owner=owner,
                                    bounds=bounds, admission=admission, idle_period=config.idle_refresh_period)
        self.agreement = StateAgreement(state=self, service=self.averager.service, tracker=self.tracker, role=role,
                                        load_state_timeout=averaging.load_state_timeout, partners=self._partners,
                                        watch=watch)
        self.agreement.publish()
        self.tracker.start()
        self.agreement.catch_up()  # a late joiner starts from the swarm's state, not from scratch

    # ---- Collaboration ------------------------------------------------------------------
    @property
    def local_epoch(self) -> int:
        return self.round

    def step(self, batch_size: int) -> None:
        started = time.perf_counter()
        if self._in_flight is None:  # a round in flight brings this peer to its partners' state (swarm.train.overlap)
            self.agreement.catch_up()
        self._check_seconds += time.perf_counter() - started
        inner_started = time.perf_counter()
        if self._warmup_step is not None:
            self._warm_up_inner_lr()
        self.inner.step()
        inner = time.perf_counter() - inner_started
        self._round_samples += batch_size
        self.tracker.report(self.round, self._round_samples)
        if self._in_flight is not None and self._in_flight.done():
            self._land()
        if self._round_closed():
            self._finish_round()
        self._blocked += time.perf_counter() - started - inner

    def communication_seconds(self) -> float:
        return self._blocked

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def swarm_view(self) -> SwarmView:
        budget, samples = self._round_budget(), max(self.tracker.swarm_samples(self.round), self._round_samples)
        elapsed = time.monotonic() - self._round_started
        eta = self.config.round_timeout - elapsed  # at the latest; sooner at the swarm's pace so far
        if samples > 0:
            eta = min(eta, elapsed * max(budget - samples, 0) / samples)
        return SwarmView(num_peers=self.tracker.num_peers(), samples=samples, target=budget, eta=max(eta, 0.0),
                         epoch=max(self.tracker.rounds_of_peers().values(), default=self.round))

    def epochs_of_peers(self) -> dict[str, int]:
        return self.tracker.rounds_of_peers()

    def prefer_as_state_donor(self) -> None:
        pass  # the role travels in the state record; choose_donor prefers institutions

    def state_dict(self) -> dict:
        return {  # of the outer state: a round in flight is not in it (resumed, its progress is local drift)
            "round": self._outer_round(),
            "total_samples": self.total_samples,
            "outer_params": [p.clone() for p in self.outer_params],
            "momentum": [self.outer.state[p]["momentum_buffer"].clone() for p in self.outer_params],
            "inner": self._inner_state(),
        }

    def _inner_state(self) -> dict:
        """The inner optimizer's state, at its configured learning rates (a checkpoint taken mid-warm-up must not
        resume at a scaled-down rate: a resumed optimizer is not fresh, so it does not warm up again)."""
        state = self.inner.state_dict()
        if self._warmup_step is not None:
            for group, lr in zip(state["param_groups"], self._base_lrs):
                group["lr"] = lr
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; the model's own (local) parameters come from the checkpoint's model."""
        self._set_outer(state["round"], state["total_samples"], state["outer_params"], state["momentum"], keep_local=True)
        self.inner.load_state_dict(state["inner"])
        self._start_round()
        self.agreement.publish()

    def counters(self) -> Counters:
        counters = self.averager.counters
        counters.state_downloads = self.agreement.downloads
        counters.refused_requests = dict(self.averager.service.refused)  # one C call: safe while the loop counts
        counters.extra = {"state_hash": self.agreement.shared_hash[:16], "total_samples": self.total_samples,
                          "residual_norm": round(self.averager.plan.residual_norm(), 6)}
        return counters

    def finish(self, stop, deadline: float) -> bool:
        """Keep serving and comparing states until every peer still in the run holds this one's: a
        peer whose last round failed adopts the swarm's state here, as it would have at its next step.
        The last round, if still in flight, lands first."""
        if self._in_flight is not None and not self._land(stop=stop):
            return False
        return self.agreement.settle(peers_in_run=lambda: self.tracker.rounds_of_peers(), stop=stop, deadline=deadline)

    def check(self) -> None:
        self.tracker.check()
        self.averager.check()

    def shutdown(self) -> None:
        self.tracker.shutdown()
        self.averager.shutdown()
        # A signal mid-round: the averaging thread (a daemon) ends with the service. The round stays in flight,
        # not landed: the checkpoint saved on the way out holds the outer state before it plus the local drift.
        if self._in_flight is not None and not self._in_flight.join(timeout=2.0):
            logger.warning(f"left with round {self._in_flight.round_number}'s averaging still running")

    # ---- rounds --------------------------------------------------------------------------
    def _partners(self) -> list[str]:
        group = self.averager.last_group
        return [peer.to_base58() for peer in group.members] if group is not None else []

    def _round_budget(self) -> int:
        """Swarm-wide samples that close this round."""
        return self.config.round_samples or self.config.inner_steps * self.batch_size * len(self.tracker.expected(self.round))

    def _round_closed(self) -> bool:
        swarm_samples, budget = max(self.tracker.swarm_samples(self.round), self._round_samples), self._round_budget()
        elapsed = time.monotonic() - self._round_started
        if self.config.idle_refresh_period is not None:  # report often only when the round is about to close
            # the others' records may be an idle period old, without a rate yet: also count them at this peer's pace
            near = max(swarm_samples, self._round_samples * len(self.tracker.expected(self.round)))
            left = min(elapsed * max(budget - near, 0) / max(near, 1), self.config.round_timeout - elapsed)
            self.tracker.hurry(left < HURRY_REPORTS * self.config.refresh_period)  # the switch refreshes at once
        if swarm_samples >= budget or elapsed >= self.config.round_timeout:
            return True
        # With overlap, a peer that closed this round reports the next one at once, so its samples no longer
        # count towards this one: that it moved on is what says this round closed.
        return self.config.overlap and any(r > self.round for r in self.tracker.rounds_of_peers().values())

    def _outer_round(self) -> int:
        """The round of the outer state: the round being trained, less the one in flight."""
        return self.round - (1 if self._in_flight is not None else 0)

    def _finish_round(self) -> None:
        averaging_started = time.monotonic()
        trained, checks, here = averaging_started - self._round_started, self._check_seconds, self._round_samples
        if self._in_flight is not None:  # the previous round's average is late: it lands before this one starts
            self._land()
        deltas = [outer - local.detach().to("cpu", torch.float32) for outer, local in zip(self.outer_params, self.params)]
        if self.config.overlap:
            self._start_average(deltas)
            logger.info(f"round {self.round - 1} closed, {here} samples here in {trained:.1f} s (state checks "
                        f"{checks:.2f} s); averaging it in the background while round {self.round} trains")
            return
        result = self.averager.average(self.round, deltas, weight=float(self._round_samples),
                                       expected=lambda: self.tracker.expected(self.round))
        self._outer_step(result.tensors)
        total = int(result.total_weight)
        self.total_samples += total
        self.round += 1
        self._start_round()
        self.agreement.publish()
        # Where the round's wall time went: this peer's steps (the per-step state checks among them), then
        # averaging (matchmaking and waiting for the others, the all-reduce, the outer step, publishing).
        averaging = time.monotonic() - averaging_started
        logger.info(f"round {self.round - 1} done with {result.group_size} peer(s), {total} samples ({here} here) "
                    f"in {trained + averaging:.1f} s: training {trained:.1f} s (state checks {checks:.2f} s), "
                    f"averaging {averaging:.1f} s; now round {self.round}")

    def _start_average(self, deltas: list[torch.Tensor]) -> None:
        """Average this round in the background (diloco.overlap) and start the next one now."""
        round_number, weight = self.round, float(self._round_samples)
        # its members are training the next round by the time they meet: expected() counts them there
        self._in_flight = InFlight(
            round_number=round_number, snapshot=snapshot(self.params),
            average=lambda: self.averager.average(round_number, deltas, weight=weight,
                                                  expected=lambda: self.tracker.expected(round_number + 1)))
        self.round += 1
        self._start_round()

    def _land(self, stop=None) -> bool:
        """Apply the outer step of the round in flight (waits for its average; raises what averaging
        raised), keeping the local progress made since it closed. With ``stop``: False, landing
        nothing, if it is set first."""
        pending = self._in_flight
        waited = time.monotonic()
        while stop is not None and not pending.wait(0.5):
            if stop.is_set():
                return False
        result = pending.result()
        self._in_flight = None
        self._outer_step(result.tensors, before=pending.snapshot)
        total = int(result.total_weight)
        self.total_samples += total
        self.agreement.publish()
        logger.info(f"round {pending.round_number} landed with {result.group_size} peer(s), {total} samples "
                    f"(waited {time.monotonic() - waited:.1f} s for it)")
        return True

    def _outer_step(self, averaged: list[torch.Tensor], before: Optional[list[torch.Tensor]] = None) -> None:
        """The outer step, then the local parameters: the new outer ones, plus (overlap) the drift from ``before``."""
        for param, grad in zip(self.outer_params, averaged):
            param.grad = grad.to(param.dtype)
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        if before is not None:
            carry_drift(self.params, self.outer_params, before)
            return
        with torch.no_grad():
            for local, outer in zip(self.params, self.outer_params):
                local.copy_(outer.to(local.device, local.dtype))

    def _start_round(self) -> None:
        self._round_samples, self._round_started, self._check_seconds = 0, time.monotonic(), 0.0
        self.tracker.report(self.round, 0)
        self.tracker.hurry(False)  # before the new state is published: its report is the round's first, then idle

    # ---- the shared state (swarm.train.agreement.SharedState) ------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        return self.outer_params + [self.outer.state[p]["momentum_buffer"] for p in self.outer_params]

    def position(self) -> tuple[int, int]:
        return self._outer_round(), self.total_samples

    def capture(self) -> State:
        return {"round": self._outer_round(), "total": self.total_samples}, [t.clone() for t in self._state_tensors()]

    def digest(self, state: State) -> str:
        header, tensors = state
        return state_digest(int(header["round"]), int(header["total"]), tensors)

    def adopt(self, state: State) -> None:
        header, tensors = state
        expected = len(self.outer_params)
        if len(tensors) != 2 * expected or any(t.shape != p.shape for t, p in zip(tensors, self._state_tensors())):
            raise ValueError("the state does not match this model")
        previous = self.round
        if int(header["round"]) > 0 and not self.inner.state and self.config.join_warmup_steps > 0:
            self._warmup_step = 0  # joining a running swarm with a fresh inner optimizer (diloco.join_warmup_steps)
            self._base_lrs = [group["lr"] for group in self.inner.param_groups]
        self._set_outer(int(header["round"]), int(header["total"]), tensors[:expected], tensors[expected:])
        self._start_round()
        logger.info(f"adopted the swarm's state: round {previous} -> {self.round}, {self.total_samples} samples seen"
                    + (f"; inner learning rate warming up over {self.config.join_warmup_steps} steps (a fresh "
                       "optimizer joining a running swarm)" if self._warmup_step == 0 else ""))

    def _warm_up_inner_lr(self) -> None:
        """Scale the inner learning rate by k / diloco.join_warmup_steps at the k-th inner step (from 1) since this
        peer, its inner optimizer fresh, adopted a running swarm's state; back to the configured rate after."""
        self._warmup_step += 1
        factor = min(1.0, self._warmup_step / self.config.join_warmup_steps)
        for group, lr in zip(self.inner.param_groups, self._base_lrs):
            group["lr"] = lr * factor
        if factor >= 1.0:
            self._warmup_step = None

    def _set_outer(self, round_number: int, total: int, outer_params: list[torch.Tensor], momentum: list[torch.Tensor],
                   keep_local: bool = False) -> None:
        with torch.no_grad():
            for param, value, buffer in zip(self.outer_params, outer_params, momentum):
                param.copy_(value)
                self.outer.state[param]["momentum_buffer"].copy_(buffer)
            if not keep_local:
                for local, outer in zip(self.params, self.outer_params):
                    local.copy_(outer.to(local.device, local.dtype))
        self.round, self.total_samples = round_number, total
        self.averager.plan.forget_residuals()
