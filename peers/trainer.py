"""`swarm join`: a trainer peer. Load config, check local inputs, join, train, leave cleanly.

Local inputs (checkpoint, data) are checked before the network is touched, so a user's mistake ends
in one line without a half-joined peer. On SIGINT/SIGTERM the peer finishes its step, says goodbye
to the averagers, writes a final checkpoint and shuts its DHT down.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from peers.lifecycle import StopSignals, check_alive, reap_children, run_bounded, set_log_peer
from peers.progress import ProgressLog
from peers.status_file import StatusFile
from swarm.averaging.progress import DownloadWatch
from swarm.config.schema import SwarmConfig, TrainingConfig
from swarm.errors import CheckpointError
from swarm.net.admission import Admission, authorizer_for, check_admitted, own_certificate, own_role
from swarm.net.certificate_record import CertificateValidator
from swarm.net.dht import shutdown_dht, start_dht, visible_maddrs
from swarm.net.identity import load_identity
from swarm.net.manifest import apply_manifest
from swarm.net.manifest_record import ManifestValidator, SignedManifest, fetch_manifest
from swarm.net.validators import run_validators
from swarm.telemetry.metrics import MetricsPublisher, PeerFacts
from swarm.telemetry.probe import install_probe
from swarm.train import checkpoint as ckpt
from swarm.train.data import TextDataset, load_dataset
from swarm.train.device import describe_device, resolve_device
from swarm.train.factory import build_collaboration
from swarm.train.fit import choose_batch_size, resolve_precision
from swarm.train.loop import TrainingLoop, TrainingStatus
from swarm.train.model import ByteGPT
from swarm.train.rounds import record_bounds
from swarm.train.sync import inner_optimizer_factory

logger = logging.getLogger(__name__)

OPTIMIZER_SHUTDOWN_TIMEOUT = 8.0  # seconds to say goodbye to averaging groups before leaving anyway
METRICS_SHUTDOWN_TIMEOUT = 4.0  # seconds to publish the last "left" record before leaving anyway


def run_trainer(config: SwarmConfig, *, status_path: Optional[Path] = None, run: Optional[str] = None,
                explicit: frozenset[str] = frozenset(), new_swarm: bool = False) -> TrainingStatus:
    """Train until the run ends or a signal comes.

    :param run: the fingerprint of the run to join: its settings come from its manifest in the DHT,
      and the local inputs are checked once they are known (after joining the DHT).
    :param explicit: the dotted config keys this peer set itself; any that contradicts the manifest
      is a :class:`~swarm.errors.ManifestError`.
    :param new_swarm: this peer starts a new swarm (it has no initial peers): it says so, with the line
      others join it with.
    """
    stop = StopSignals()
    # hivemind steps the scheduler when the swarm's epoch advances, which torch mistakes for misuse
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    local = _prepare_local(config) if run is None else None
    identity = load_identity(config.network.identity_path)
    dht, config, signed, admission = _join(config, identity, stop, run=run, explicit=explicit)
    try:
        local = local or _prepare_local(config)
        config = config.model_copy(update={"training": local.training})
        install_probe(dht)  # what `swarm doctor` asks of the swarm's peers
    except BaseException:
        if admission is not None:
            admission.shutdown()
        shutdown_dht(dht)
        raise
    peer = _TrainerPeer(config, local, dht, signed=signed, admission=admission)
    try:
        peer.start(identity, status_path)
        if new_swarm:
            print(f"swarm join: started a new swarm of run {config.run_id}; others join it with:\n"
                  f"  swarm join --initial-peers {visible_maddrs(dht)[0]}", flush=True)
        try:
            peer.loop().run(stop.event)
        except KeyboardInterrupt:
            logger.info("interrupted inside a step; leaving without finishing it")
        stop.disarm()
        return peer.leave()
    finally:
        stop.disarm()
        peer.close()
        if admission is not None:
            admission.shutdown()
        shutdown_dht(dht)
        reap_children()
        # hivemind leaves a few asyncio tasks pending at interpreter exit; they are harmless here
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        logger.info("left the swarm")


def _join(config: SwarmConfig, identity, stop: StopSignals, *, run: Optional[str], explicit: frozenset[str]):
    """Start the DHT; with a run (``--run``, or the one this peer's certificate names), fetch the run's
    manifest, return the config with its settings and keep the run's admissions (:class:`Admission`)."""
    run, certificate = own_certificate(config.peer.certificate, run=run, peer_id=identity.peer_id)
    if run is None:
        return start_dht(config.network, identity=identity, stop=stop.event,
                         record_validators=run_validators(config.run_id, identity.private_key,
                                                          record_bounds(config))), config, None, None
    dht = start_dht(config.network, identity=identity, stop=stop.event,
                    record_validators=[ManifestValidator(run), CertificateValidator(run)],
                    authorizer=authorizer_for(identity, certificate, run))
    try:
        signed = fetch_manifest(dht, run, timeout=config.network.bootstrap_timeout, stop=stop.event)
        check_admitted(signed, certificate, trains=True)
        config = apply_manifest(config, set(explicit), signed.manifest)
        dht.add_validators(run_validators(config.run_id, identity.private_key, record_bounds(config)))
        admission = Admission(dht=dht, run=run, manifest=signed, certificate=certificate).start()
    except BaseException:
        shutdown_dht(dht)
        raise
    logger.info(f"run {config.run_id} ({run}, {signed.manifest.admission}): settings from its manifest, "
                f"version {signed.manifest.version}")
    return dht, config, signed, admission


@dataclass
class _Local:
    """What a trainer prepares before it touches the network: a user's mistake here costs no join."""

    device: torch.device
    dataset: TextDataset
    model: ByteGPT
    resume_from: Optional[ckpt.Checkpoint]
    training: TrainingConfig  # the config's, with batch_size and precision resolved for this device


def _prepare_local(config: SwarmConfig) -> _Local:
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    device = resolve_device(config.training.device)
    resume_from = _preflight_checkpoint(config, config.model.model_dump())
    dataset = load_dataset(config.data, config.model.seq_len)
    training = _fit_training(config, device)
    # the same initial weights on every peer of a run, so a new swarm starts in agreement
    torch.manual_seed(zlib.crc32(config.run_id.encode()) + config.training.seed)
    model = ByteGPT(config.model)
    if resume_from is not None:
        model.load_state_dict(resume_from.model)  # before the optimizer copies the parameters
    model.to(device)
    return _Local(device, dataset, model, resume_from, training)


def _fit_training(config: SwarmConfig, device: torch.device) -> TrainingConfig:
    """``training`` with ``precision`` and ``batch_size: auto`` resolved on this device (before the
    model's seeded initialisation, which the measurement must not shift)."""
    training = config.training
    precision = resolve_precision(training.precision, device)
    batch_size = training.batch_size
    if batch_size == "auto":
        def build():
            model = ByteGPT(config.model).to(device)
            return model, inner_optimizer_factory(config.optimizer)(model.parameters())
        cost = choose_batch_size(build, seq_len=config.model.seq_len, device=device, precision=precision)
        batch_size = cost.batch_size
        logger.info(f"training.batch_size auto: {batch_size} (a step takes about {cost.peak_bytes / 2**20:.0f} MiB "
                    f"and {cost.seconds:.2f} s on {describe_device(device)}, {precision})")
    return training.model_copy(update={"batch_size": batch_size, "precision": precision})


class _TrainerPeer:
    """The joined trainer's components: collaboration, status file and metrics publisher."""

    def __init__(self, config: SwarmConfig, local: _Local, dht, *, signed: Optional[SignedManifest] = None,
                 admission: Optional[Admission] = None):
        self.config, self.local, self.dht, self.admission = config, local, dht, admission
        self.opt = self.status_file = self.publisher = None
        self.role = own_role(admission.certificate if admission is not None else None)
        self.status = TrainingStatus(peer_id=str(dht.peer_id), role=self.role)
        self.watch = DownloadWatch()  # the collaboration's state downloads, shown by the progress lines
        self.progress = ProgressLog(self.status, self.watch, mode=config.averaging.mode)
        # which run this peer trains in, for its status file (the join test reads it)
        self.run = {"run_id": config.run_id, "fingerprint": signed.fingerprint if signed else None,
                    "manifest_version": signed.manifest.version if signed else None,
                    "admission": signed.manifest.admission if signed else None,
                    "model": config.model.model_dump(), "averaging_mode": config.averaging.mode}

    def start(self, identity, status_path: Optional[Path]) -> None:
        config, local, dht = self.config, self.local, self.dht
        set_log_peer(self.role, str(dht.peer_id))
        logger.info(
            f"joined run {config.run_id} as {self.role} ({visible_maddrs(dht)[0]}); model "
            f"{local.model.num_parameters() / 1e6:.2f}M parameters on {local.device}; data {local.dataset.source} "
            f"({local.dataset.num_train_files} files, {local.dataset.train.numel() / 1e6:.1f} MB)"
        )
        self.progress.start()  # before the collaboration: a late joiner's first state download shows
        self.opt = build_collaboration(config=config, dht=dht, model=local.model, private_key=identity.private_key,
                                       role=self.role, admission=self.admission, watch=self.watch)
        if config.metrics is not None:
            facts = PeerFacts(role=self.role, peer=config.peer, device=describe_device(local.device))
            self.publisher = MetricsPublisher(dht=dht, identity=identity, run_id=config.run_id, config=config.metrics,
                                              facts=facts).start()
        if local.resume_from is not None:
            self._resume(local.resume_from)
        self.status.epoch = self.status.start_epoch = self.opt.local_epoch
        self.status_file = StatusFile(status_path, dht=dht,
                                      snapshot=lambda: {**self.status.as_dict(), "run": self.run},
                                      initial_peers=len(config.network.initial_peers))
        self.status_file.start()

    def _resume(self, checkpoint: ckpt.Checkpoint) -> None:
        self.opt.load_state_dict(checkpoint.optimizer)
        self.status.resumed_state_hash = self._snapshot().state_hash
        logger.info(f"resumed from {self.config.checkpoint.dir} at epoch {self.opt.local_epoch}")
        if self.status.resumed_state_hash != checkpoint.state_hash:
            logger.warning("restored state differs from the checkpoint's recorded hash")

    def _snapshot(self) -> ckpt.Checkpoint:
        return ckpt.capture(self.local.model, self.opt, run_id=self.config.run_id,
                            model_config=self.config.model.model_dump())

    def save(self) -> str:
        snapshot = self._snapshot()
        ckpt.save_checkpoint(self.config.checkpoint.dir, snapshot)
        return snapshot.state_hash

    def _publish(self, current: TrainingStatus) -> None:
        """The training loop's status hook: also where a dead background thread stops the peer."""
        check_alive(self.status_file, self.publisher, self.opt, self.dht.rejoin, self.admission)
        self.status_file.publish()
        if self.publisher is not None:
            self.publisher.update(current)

    def loop(self) -> TrainingLoop:
        config, checkpoint = self.config, self.config.checkpoint
        return TrainingLoop(
            model=self.local.model, opt=self.opt, dataset=self.local.dataset, config=config.training,
            seq_len=config.model.seq_len, device=self.local.device, status=self.status,
            grad_clip=config.optimizer.grad_clip, prefer_as_donor=self.role == "institution",
            save_checkpoint=self.save if checkpoint is not None else None,
            checkpoint_every=checkpoint.every_epochs if checkpoint is not None else None,
            on_status=self._publish,
        )

    def leave(self) -> TrainingStatus:
        """After training: a last metrics record, goodbye to the averagers, a final checkpoint."""
        status = self.status
        self.progress.shutdown()
        self.status_file.shutdown()
        if self.publisher is not None:
            self.publisher.update(status)
            run_bounded("metrics shutdown", partial(self.publisher.shutdown, timeout=METRICS_SHUTDOWN_TIMEOUT / 2),
                        METRICS_SHUTDOWN_TIMEOUT)
            self.publisher = None
        run_bounded("optimizer shutdown", self.opt.shutdown, OPTIMIZER_SHUTDOWN_TIMEOUT)
        if self.config.checkpoint is not None:
            status.last_checkpoint_hash = self.save()
            logger.info(f"checkpoint saved to {ckpt.checkpoint_path(self.config.checkpoint.dir)}")
        status.finished = True
        self.status_file.publish()
        return status

    def close(self) -> None:
        """Whatever :meth:`leave` did not get to (an error): no "left" record, the record just expires."""
        self.progress.shutdown()
        if self.status_file is not None:
            self.status_file.shutdown()
        if self.publisher is not None:
            self.publisher.shutdown(leave=False, timeout=1.0)


def _preflight_checkpoint(config: SwarmConfig, model_config: dict) -> Optional[ckpt.Checkpoint]:
    """The checkpoint to resume from, or None; refuses to overwrite one that --resume would use.

    ``checkpoint.resume: auto`` resumes when a checkpoint is there and starts fresh otherwise, so a
    container restarted with the same state volume carries on where it stopped.
    """
    if config.checkpoint is None:
        return None
    path = ckpt.checkpoint_path(config.checkpoint.dir)
    resume = path.exists() if config.checkpoint.resume == "auto" else config.checkpoint.resume
    if resume:
        return ckpt.load_checkpoint(config.checkpoint.dir, run_id=config.run_id, model_config=model_config)
    if path.exists():
        raise CheckpointError(
            f"a checkpoint already exists at {path}; pass --resume (or set checkpoint.resume=auto) to continue "
            f"from it, or set checkpoint.dir to another folder"
        )
    return None
