"""`swarm join`: a trainer peer. Load config, check local inputs, join, train, leave cleanly.

Local inputs (checkpoint, data) are checked before the network is touched, so a user's mistake ends
in one line without a half-joined peer. On SIGINT/SIGTERM the peer finishes its step, says goodbye
to the averagers, writes a final checkpoint and shuts its DHT down.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from peers.lifecycle import StopSignals, reap_children, run_bounded, set_log_peer
from peers.status_file import StatusFile
from swarm.train import checkpoint as ckpt
from swarm.config.schema import SwarmConfig
from swarm.train.data import load_dataset
from swarm.train.device import describe_device, resolve_device
from swarm.errors import CheckpointError
from swarm.net.identity import load_identity
from swarm.net.metrics_record import metrics_validators
from swarm.telemetry.metrics import MetricsPublisher, PeerFacts
from swarm.train.model import ByteGPT
from swarm.train.factory import build_collaboration
from swarm.net.dht import start_dht, visible_maddrs
from swarm.train.loop import TrainingLoop, TrainingStatus

logger = logging.getLogger(__name__)

OPTIMIZER_SHUTDOWN_TIMEOUT = 8.0  # seconds to say goodbye to averaging groups before leaving anyway
METRICS_SHUTDOWN_TIMEOUT = 4.0  # seconds to publish the last "left" record before leaving anyway


def run_trainer(config: SwarmConfig, *, status_path: Optional[Path] = None) -> TrainingStatus:
    stop = StopSignals()
    # hivemind steps the scheduler when the swarm's epoch advances, which torch mistakes for misuse
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    device = resolve_device(config.training.device)
    model_config = config.model.model_dump()
    resume_from = _preflight_checkpoint(config, model_config)
    dataset = load_dataset(config.data, config.model.seq_len)

    # the same initial weights on every peer of a run, so a new swarm starts in agreement
    torch.manual_seed(zlib.crc32(config.run_id.encode()) + config.training.seed)
    model = ByteGPT(config.model)
    if resume_from is not None:
        model.load_state_dict(resume_from.model)  # before the optimizer copies the parameters
    model.to(device)

    identity = load_identity(config.network.identity_path)
    dht = start_dht(config.network, identity=identity, stop=stop.event,
                    record_validators=metrics_validators(config.run_id, identity.private_key))
    opt = status_file = publisher = None
    try:
        set_log_peer(config.peer.role, str(dht.peer_id))
        logger.info(
            f"joined run {config.run_id} as {config.peer.role} ({visible_maddrs(dht)[0]}); model "
            f"{model.num_parameters() / 1e6:.2f}M parameters on {device}; data {dataset.source} "
            f"({dataset.num_train_files} files, {dataset.train.numel() / 1e6:.1f} MB)"
        )
        opt = build_collaboration(config=config, dht=dht, model=model, private_key=identity.private_key)
        status = TrainingStatus(peer_id=str(dht.peer_id), role=config.peer.role)
        if config.metrics is not None:
            facts = PeerFacts(role=config.peer.role, peer=config.peer, device=describe_device(device))
            publisher = MetricsPublisher(dht=dht, identity=identity, run_id=config.run_id, config=config.metrics,
                                         facts=facts).start()
        if resume_from is not None:
            opt.load_state_dict(resume_from.optimizer)
            status.resumed_state_hash = _snapshot(model, opt, config).state_hash
            logger.info(f"resumed from {config.checkpoint.dir} at epoch {opt.local_epoch}")
            if status.resumed_state_hash != resume_from.state_hash:
                logger.warning("restored state differs from the checkpoint's recorded hash")

        def save() -> str:
            snapshot = _snapshot(model, opt, config)
            ckpt.save_checkpoint(config.checkpoint.dir, snapshot)
            return snapshot.state_hash

        status.epoch = status.start_epoch = opt.local_epoch
        status_file = StatusFile(status_path, dht=dht, snapshot=status.as_dict,
                                 initial_peers=len(config.network.initial_peers))
        status_file.start()

        def publish(current: TrainingStatus) -> None:
            status_file.publish()
            if publisher is not None:
                publisher.update(current)

        loop = TrainingLoop(
            model=model,
            opt=opt,
            dataset=dataset,
            config=config.training,
            seq_len=config.model.seq_len,
            device=device,
            status=status,
            grad_clip=config.optimizer.grad_clip,
            prefer_as_donor=config.peer.role == "institution",
            save_checkpoint=save if config.checkpoint is not None else None,
            checkpoint_every=config.checkpoint.every_epochs if config.checkpoint is not None else None,
            on_status=publish,
        )
        try:
            loop.run(stop.event)
        except KeyboardInterrupt:
            logger.info("interrupted inside a step; leaving without finishing it")
        stop.disarm()
        status_file.shutdown()
        if publisher is not None:
            publisher.update(status)
            run_bounded("metrics shutdown", partial(publisher.shutdown, timeout=METRICS_SHUTDOWN_TIMEOUT / 2),
                        METRICS_SHUTDOWN_TIMEOUT)
            publisher = None
        run_bounded("optimizer shutdown", opt.shutdown, OPTIMIZER_SHUTDOWN_TIMEOUT)
        if config.checkpoint is not None:
            status.last_checkpoint_hash = save()
            logger.info(f"checkpoint saved to {ckpt.checkpoint_path(config.checkpoint.dir)}")
        status.finished = True
        status_file.publish()
        return status
    finally:
        stop.disarm()
        if status_file is not None:
            status_file.shutdown()
        if publisher is not None:  # left through an error: no "left" record, the record just expires
            publisher.shutdown(leave=False, timeout=1.0)
        dht.shutdown()
        reap_children()
        # hivemind leaves a few asyncio tasks pending at interpreter exit; they are harmless here
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        logger.info("left the swarm")


def _snapshot(model: torch.nn.Module, opt, config: SwarmConfig) -> ckpt.Checkpoint:
    return ckpt.capture(model, opt, run_id=config.run_id, model_config=config.model.model_dump())


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
