"""Build the collaborative optimizer: an inner torch optimizer wrapped by hivemind.Optimizer.

hivemind.Optimizer accumulates gradients until the swarm as a whole has processed
``training.target_batch_size`` samples, averages them with butterfly all-reduce, and steps every
peer's inner optimizer with the same averaged gradient, so parameters stay in agreement.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Optional

import hivemind
import torch
from hivemind.averaging.control import StepControl
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.optim.state_averager import load_optimizer_state
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.counters import Counters
from swarm.averaging.progress import DownloadWatch
from swarm.averaging.service import AveragingService
from swarm.compression.registry import make_codec
from swarm.config.schema import AveragingConfig, OptimizerConfig, SyncConfig, TrainingConfig
from swarm.hivemind_private import publish_progress, push_loaded_state
from swarm.net.admission import Admission
from swarm.net.signed_record import owner_tag
from swarm.train.agreement import SharedState, State, StateAgreement, state_digest
from swarm.train.collaboration import Collaboration, SwarmView
from swarm.train.rounds import RoundTracker

# State sharing priority is the donor's epoch; institutions add this bonus so that a late joiner
# picks an institution over a volunteer at the same epoch, yet never over a peer that is ahead.
INSTITUTION_PRIORITY_BONUS = 0.5
SETTLE_REFRESH_PERIOD = 1.0  # seconds between state-record refreshes while settling the end of a run


def inner_optimizer_factory(config: OptimizerConfig) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    """A callable(params) -> optimizer, as hivemind.Optimizer wants it."""
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.name == "adamw8bit":
        import bitsandbytes as bnb  # imported on demand: costs about 2 s and prints a notice

        return lambda params: bnb.optim.AdamW8bit(params, **kwargs)
    return lambda params: torch.optim.AdamW(params, **kwargs)


def warmup_scheduler_factory(config: OptimizerConfig):
    """Linear warm-up over swarm epochs (hivemind steps the scheduler once per epoch); None if off."""
    if config.warmup_epochs == 0:
        return None
    warmup = config.warmup_epochs
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: min(1.0, (epoch + 1) / warmup))


def count_round(counters: Counters, control: StepControl) -> None:
    """Add one finished all-reduce round to ``counters`` by its outcome (a done StepControl)."""
    if control.cancelled():
        return  # hivemind cancels a pre-scheduled round when no other peer is left: not a round
    if control.exception() is None:
        counters.rounds_ok += 1
    else:
        counters.rounds_failed += 1  # then hivemind.Optimizer proceeds with local gradients


class RoundCounting:
    """Mixin for hivemind's gradient averagers: reports each round's outcome to a :class:`Counters`.

    hivemind.Optimizer counts nothing itself: it logs "Averaging gradients failed" and proceeds with
    local gradients. Every round it runs goes through ``step(control=..., wait=False)``, which returns
    the round's StepControl, a future that ends with the group on success or an error on failure.
    tests/test_monitor.py checks that both trainers of a swarm count successful rounds.
    The counters are written by one thread (the futures' backend) and read by others.
    """

    def __init__(self, *args, counters: Counters, **kwargs):
        self.round_counters = counters
        super().__init__(*args, **kwargs)

    def step(self, *args, **kwargs):
        wait = kwargs.get("wait", True)
        kwargs["wait"] = False
        control = super().step(*args, **kwargs)
        control.add_done_callback(partial(count_round, self.round_counters))
        return control.result(kwargs.get("timeout")) if wait else control


MAX_ETA = 7 * 86400.0  # seconds; a longer estimate of the time to the next epoch means "unknown"


class ObservedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer whose state downloads (a peer that fell behind catches up) show in a
    :class:`DownloadWatch`. hivemind downloads inside its averager's own process, so the bytes received
    are not seen here: only the expected size and the time it has taken."""

    def __init__(self, *args, watch: DownloadWatch, **kwargs):
        self.watch = watch
        super().__init__(*args, **kwargs)

    def load_state_from_peers(self, **kwargs):
        tensors = self.state_averager.get_current_state()[1]
        self.watch.begin("the swarm", sum(t.numel() * t.element_size() for t in tensors), counts_bytes=False)
        try:
            return super().load_state_from_peers(**kwargs)
        finally:
            self.watch.end()


class CountingGradientAverager(RoundCounting, GradientAverager):
    pass


class CountingPowerSGDAverager(RoundCounting, PowerSGDGradientAverager):
    pass


def build_collaborative_optimizer(
    *,
    dht: hivemind.DHT,
    run_id: str,
    role: str,
    params: Iterable[torch.nn.Parameter],
    optimizer: OptimizerConfig,
    training: TrainingConfig,
    averaging: AveragingConfig,
    sync: SyncConfig,
    private_key: Optional[RSAPrivateKey] = None,
    admission: Optional[Admission] = None,
    watch: Optional[DownloadWatch] = None,
) -> HivemindSync:
    """hivemind.Optimizer for ``averaging.mode == "sync"``.

    ``client_mode`` is passed equal to the DHT's own: hivemind 1.1.12's optimizer and progress tracker
    disagree on its default otherwise. Gradients travel with ``averaging.compression``; ``powersgd``
    uses hivemind's own PowerSGD averager (which keeps its own error feedback); the per-tensor codecs
    have none in this mode.

    :param private_key: the peer's identity key (:mod:`swarm.net.identity`). The DHT signs ``[owner:...]``
      records with one key only, so the progress tracker must sign with the same one.
    :param admission: used by the end-of-run settlement (hivemind's averagers take no caller checks,
      which is why a private run cannot be in sync mode).
    :param watch: where state downloads show their progress (hivemind's, and the settlement's).
    """
    watch = watch or DownloadWatch()
    counters = Counters()
    averager = partial(CountingGradientAverager, counters=counters, request_timeout=averaging.request_timeout)
    compression = make_codec("none")
    if averaging.compression == "powersgd":
        averager = partial(CountingPowerSGDAverager, counters=counters, averager_rank=averaging.powersgd_rank,
                           request_timeout=averaging.request_timeout)
    else:
        compression = make_codec(averaging.compression, adaptive_threshold=averaging.adaptive_threshold)
    return HivemindSync(ObservedOptimizer(
        watch=watch,
        dht=dht,
        run_id=run_id,
        params=list(params),
        optimizer=inner_optimizer_factory(optimizer),
        scheduler=warmup_scheduler_factory(optimizer),
        target_batch_size=training.target_batch_size,
        batch_size_per_step=training.batch_size,
        matchmaking_time=sync.matchmaking_time,
        averaging_timeout=averaging.averaging_timeout,
        load_state_timeout=averaging.load_state_timeout,
        average_state_every=sync.average_state_every,
        client_mode=dht.client_mode,
        averager_opts=dict(request_timeout=averaging.request_timeout),
        # hivemind 1.1.12 forwards averager_opts to the state averager only, not to the gradient averager
        grad_averager_factory=averager,
        grad_compression=compression,
        tracker_opts=dict(private_key=private_key) if private_key is not None else None,
        verbose=True,  # hivemind logs each averaging outcome at INFO; shown when SWARM_HIVEMIND_LOGLEVEL=INFO
    ), counters, run_id=run_id, role=role, averaging=averaging, last_epoch=training.max_epochs, private_key=private_key,
        admission=admission)


class HivemindSync(Collaboration):
    """``averaging.mode: sync``: hivemind.Optimizer averages gradients once the swarm has gathered
    ``training.target_batch_size`` samples, and every peer applies the same averaged step."""

    def __init__(self, opt: hivemind.Optimizer, counters: Counters, *, run_id: str, role: str,
                 averaging: AveragingConfig, last_epoch: Optional[int], private_key: Optional[RSAPrivateKey] = None,
                 admission: Optional[Admission] = None):
        self.opt, self.admission = opt, admission
        self.private_key = private_key  # signs this peer's state record when settling (swarm.net.diloco_records)
        self._counters = counters  # rounds by outcome; bytes are not measured in this mode
        self.run_id, self.role, self.averaging = run_id, role, averaging
        self.last_epoch = last_epoch  # training.max_epochs
        self._announced_last_epoch = False

    @property
    def local_epoch(self) -> int:
        return self.opt.local_epoch

    @property
    def tracker(self):
        return self.opt.tracker

    def step(self, batch_size: int) -> None:
        if self.last_epoch is not None and self.opt.local_epoch + 1 >= self.last_epoch:
            # No state-averaging round at the change to the last epoch: finish() settles the final model
            # instead, and such a round, begun by a peer whose partners have already stopped, could only
            # be waited out (averaging_timeout) before this peer can settle. hivemind reads this each epoch.
            self.opt.average_state_every = self.last_epoch + 1
        self.opt.step(batch_size=batch_size)
        if self.last_epoch is not None and self.opt.local_epoch >= self.last_epoch and not self._announced_last_epoch:
            # The others wait for every peer to reach the last epoch before they settle; one that got
            # there by downloading state is not reported there by hivemind (see publish_progress).
            publish_progress(self.opt.tracker)
            self._announced_last_epoch = True

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def swarm_view(self) -> SwarmView:
        progress = self.opt.tracker.global_progress
        # hivemind's estimate, in DHT time: inf, or absurdly far, while no peer has reported a pace yet
        eta = progress.eta_next_epoch - get_dht_time()
        return SwarmView(num_peers=max(int(progress.num_peers), 1), epoch=int(progress.epoch),
                         samples=int(progress.samples_accumulated), target=int(progress.target_batch_size),
                         eta=max(eta, 0.0) if eta < MAX_ETA else None)

    def epochs_of_peers(self) -> dict[str, int]:
        """Every peer's last reported epoch, keyed by its peer id (base58), from the progress records
        hivemind keeps in the DHT (subkeys are signing keys; the record names its peer)."""
        found = self.opt.dht.get(self.opt.tracker.training_progress_key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        epochs = {}
        for record in found.value.values():
            progress = getattr(record, "value", None)
            if isinstance(progress, dict) and isinstance(progress.get("epoch"), int):
                try:
                    epochs[PeerID(progress["peer_id"]).to_base58()] = progress["epoch"]
                except Exception:  # a record without a well-formed peer id (a broken or hostile peer)
                    continue
        return epochs

    def prefer_as_state_donor(self, bonus: float = INSTITUTION_PRIORITY_BONUS) -> None:
        """Advertise this peer's state with its epoch plus ``bonus`` (re-applied after each epoch change)."""
        if self.opt.client_mode:
            return  # client-mode peers cannot serve state
        priority = float(self.opt.local_epoch) + bonus
        averagers = [self.opt.state_averager] + ([self.opt.grad_averager] if self.opt.grad_averager is not None else [])
        for averager in averagers:
            if averager.state_sharing_priority != priority:
                averager.state_sharing_priority = priority

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)

    def counters(self) -> Counters:
        return self._counters

    def finish(self, stop, deadline: float) -> bool:
        """Apply the last background state-averaging round, then settle on one final model with the
        peers that finished (:meth:`swarm.train.agreement.StateAgreement.settle`): the last epoch's
        averaging may have left this peer one local step, or one lost part, away from the others."""
        self.opt.state_averager.step(wait_for_delayed_updates=True)
        averaging, epoch = self.averaging, self.local_epoch
        admit = self.admission.refusal if self.admission is not None else None
        service = AveragingService(dht=self.opt.dht, run_id=self.run_id, chunk_timeout=averaging.chunk_timeout,
                                   request_timeout=averaging.request_timeout, admit=admit).start()
        tracker = RoundTracker(dht=self.opt.dht, run_id=self.run_id, refresh_period=SETTLE_REFRESH_PERIOD,
                               owner=owner_tag(self.opt.dht, self.private_key), admission=self.admission)
        # partners: the peers of hivemind's progress records (sync mode does not know its groups; and
        # any fresh key may write those records, see the README)
        agreement = StateAgreement(state=TrainingState(self.opt.state_averager), service=service, tracker=tracker,
                                   role=self.role, load_state_timeout=averaging.load_state_timeout,
                                   partners=lambda: self.epochs_of_peers().keys(), watch=self.opt.watch)
        try:
            agreement.publish()
            tracker.start()
            return agreement.settle(peers_in_run=lambda: self.epochs_of_peers().keys(), stop=stop, deadline=deadline,
                                    round_number=epoch)
        finally:
            self._counters.state_downloads += agreement.downloads
            refused = self._counters.refused_requests  # in sync mode, swarm's own service runs only here
            for reason, count in service.refused.items():
                refused[reason] = refused.get(reason, 0) + count
            tracker.shutdown()
            service.shutdown()

    def shutdown(self) -> None:
        self.opt.shutdown()


class TrainingState(SharedState):
    """A sync-mode peer's whole training state: the parameters and the inner optimizer's state, as
    hivemind's TrainingStateAverager serves it to late joiners. :meth:`adopt` applies a state the way
    ``TrainingStateAverager.load_state_from_peers`` does, without first waiting on averaging rounds
    that can no longer find partners at the end of a run."""

    def __init__(self, averager):
        self.averager = averager

    def _parameters(self) -> list[torch.Tensor]:
        averager = self.averager
        return [param for group in averager.optimizer.param_groups for param in group["params"]] + list(averager.extra_tensors)

    def position(self) -> tuple[int, int]:
        return self.averager.local_epoch, self.averager.local_epoch

    def capture(self) -> State:
        metadata, tensors, _ = self.averager.get_current_state()
        return {"optimizer": metadata["optimizer_metadata"]}, [tensor.clone() for tensor in tensors]

    def digest(self, state: State) -> str:
        header, tensors = state
        return state_digest(self.averager.local_epoch, 0, tensors, MSGPackSerializer.dumps(header.get("optimizer")))

    @torch.no_grad()
    def adopt(self, state: State) -> None:
        header, tensors = state
        _, mine, _ = self.averager.get_current_state()  # this peer's tensors, not copied: only compared
        if len(tensors) != len(mine) or any(t.shape != m.shape or t.dtype != m.dtype for t, m in zip(tensors, mine)):
            raise ValueError("the state does not match this model and optimizer")
        averager, parameters = self.averager, self._parameters()
        with averager.lock_averaged_tensors:
            load_optimizer_state(averager.optimizer, header["optimizer"], tensors[len(parameters):])
            for local, loaded in zip(parameters, tensors):
                local.copy_(loaded)
        push_loaded_state(averager)
