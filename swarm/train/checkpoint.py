"""Checkpoints of model, optimizer and epoch: written atomically, loaded defensively.

A save writes a temporary file in the same folder, fsyncs it, renames it over ``latest.pt`` and
fsyncs the folder, so a crash mid-write leaves the previous checkpoint intact. A load uses
``torch.load(weights_only=True)``, so a hostile file cannot run code, and turns every way a file can
be broken into one :class:`CheckpointError` that leaves the file where it is.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarm.errors import CheckpointError

FORMAT = "swarm-checkpoint"
VERSION = 1
LATEST = "latest.pt"


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    local_epoch: int
    run_id: str
    model_config: dict[str, Any]
    state_hash: str


def state_hash(model_state: dict[str, Any], optimizer_state: dict[str, Any], local_epoch: int) -> str:
    """A sha256 over every tensor and scalar of model and optimizer state, in a fixed order."""
    digest = hashlib.sha256()
    _update_hash(digest, {"model": model_state, "optimizer": optimizer_state, "epoch": local_epoch})
    return digest.hexdigest()


def checkpoint_path(directory: Path) -> Path:
    return Path(directory) / LATEST


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``directory/latest.pt`` atomically and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "run_id": checkpoint.run_id,
        "model_config": checkpoint.model_config,
        "local_epoch": checkpoint.local_epoch,
        "state_hash": checkpoint.state_hash,
        "saved_at": time.time(),
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
    }
    target = checkpoint_path(directory)
    fd, tmp_name = tempfile.mkstemp(prefix=".latest-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def load_checkpoint(directory: Path, *, run_id: str, model_config: dict[str, Any]) -> Checkpoint:
    """Read ``directory/latest.pt`` and check that it belongs to this run and model.

    :raises CheckpointError: missing, unreadable, corrupt, or made for another run or model shape.
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    checkpoint = read_checkpoint(path)
    if checkpoint.run_id != run_id:
        raise CheckpointError(f"checkpoint {path} belongs to run {checkpoint.run_id!r}, not {run_id!r}")
    if checkpoint.model_config != model_config:
        raise CheckpointError(
            f"checkpoint {path} was made for model {checkpoint.model_config}, but the config asks for {model_config}"
        )
    return checkpoint


def read_checkpoint(path: Path) -> Checkpoint:
    """Read any swarm checkpoint: a file, or a folder holding ``latest.pt``. Nothing is checked against
    a config (``swarm export`` and ``swarm generate`` take run and model from the checkpoint itself).

    :raises CheckpointError: missing, unreadable, corrupt, not a swarm checkpoint, or of another format version.
    """
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # A damaged file fails anywhere in the unpickler: truncated, byte-flipped and random files raised eleven
    # types of exception (KeyError, TypeError, struct.error, ...). weights_only=True runs no code of the
    # file's, so every failure here means a bad file, and is reported as one.
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}); it was left untouched") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a swarm checkpoint; it was left untouched")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')}, expected {VERSION}")
    try:
        return Checkpoint(
            model=payload["model"],
            optimizer=payload["optimizer"],
            local_epoch=int(payload["local_epoch"]),
            run_id=payload["run_id"],
            model_config=payload["model_config"],
            state_hash=payload["state_hash"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is incomplete ({type(e).__name__}: {e}); it was left untouched") from None


def capture(model: torch.nn.Module, opt, *, run_id: str, model_config: dict[str, Any]) -> Checkpoint:
    """Snapshot a model and its (hivemind) optimizer: anything with state_dict() and local_epoch."""
    model_state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    optimizer_state = opt.state_dict()
    epoch = int(opt.local_epoch)
    return Checkpoint(
        model=model_state,
        optimizer=optimizer_state,
        local_epoch=epoch,
        run_id=run_id,
        model_config=model_config,
        state_hash=state_hash(model_state, optimizer_state, epoch),
    )


def _update_hash(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _update_hash(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _update_hash(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())

