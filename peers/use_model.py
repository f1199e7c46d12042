"""`swarm export` and `swarm generate`: the trained model outside the swarm. No peer, no network, no hivemind.

Both read ``checkpoint.dir/latest.pt`` of the config unless ``--checkpoint`` names another checkpoint
(a file, or a folder holding latest.pt); ``generate --export`` reads an export folder instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from swarm.config.schema import SwarmConfig
from swarm.errors import CheckpointError, ConfigError, ExportError
from swarm.train.export import export_checkpoint, load_checkpoint_model, load_export_model
from swarm.train.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, generate


def run_export(config: SwarmConfig, *, checkpoint: Path | None, out: Path) -> None:
    _set_threads(config)
    source = _checkpoint(config, checkpoint)
    # transformers' "Loading weights" bar and warnings say nothing here; the one line below does
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    info = export_checkpoint(source, out)
    print(f"swarm export: run {info.run_id!r} at epoch {info.local_epoch} from {source} written to {out} "
          f"(model.safetensors {info.weights_bytes / 1e6:.1f} MB); transformers' GPT2LMHeadModel matches "
          f"swarm's logits (largest difference {info.max_logit_diff:.1e})", flush=True)


def run_generate(config: SwarmConfig, *, checkpoint: Path | None, export: Path | None, prompt: str,
                 max_new_bytes: int, temperature: float, top_k: int | None, seed: int | None) -> None:
    if not prompt:
        raise ConfigError("--prompt is empty; give at least one character (the default is a newline)")
    _set_threads(config)
    if export is not None:
        source, error = export, ExportError
        model, _ = load_export_model(export)
    else:
        source, error = _checkpoint(config, checkpoint), CheckpointError
        model, _ = load_checkpoint_model(source)
    settings = {"temperature": DEFAULT_TEMPERATURE if temperature is None else temperature,
                "top_k": DEFAULT_TOP_K if top_k is None else (top_k or None)}  # --top-k 0: all bytes
    try:
        # os.fsencode gives back the bytes of the command line, also those that are not valid UTF-8
        text = generate(model, os.fsencode(prompt), max_new_bytes=max_new_bytes, seed=seed, **settings)
    except ValueError as e:  # the arguments were checked, so this is the model's: NaN or Inf logits
        raise error(f"{source}: {e}") from None
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets a '?'
    print(text.decode("utf-8", errors="replace"), flush=True)


def _set_threads(config: SwarmConfig) -> None:
    """training.threads, as a trainer uses it: one byte at a time is small work, and on a busy machine
    torch's default of one thread per core can make it many times slower than one thread."""
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)


def _checkpoint(config: SwarmConfig, checkpoint: Path | None) -> Path:
    if checkpoint is not None:
        return checkpoint
    if config.checkpoint is None:
        raise ConfigError("no checkpoint: pass --checkpoint PATH (checkpoint is null in the config)")
    return config.checkpoint.dir
