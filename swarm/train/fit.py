"""What fits this machine: one training step's cost, the batch size to use, and mixed precision.

A hobbyist should not have to know how much memory a batch takes: with ``training.batch_size: auto``
the trainer measures steps of the run's real model and optimizer on its device and takes the largest
batch (a power of two up to :data:`MAX_AUTO_BATCH`) whose step fits in :data:`HEADROOM` of the memory
that is free (on a CPU, also one whose step takes at most :data:`MAX_CPU_STEP_SECONDS`). ``training.precision: bf16`` runs the forward pass and the loss under bfloat16 autocast
(parameters, gradients and optimizer state stay fp32, so what peers average is unchanged); ``auto``
picks it where the device computes bf16 natively (CUDA with bf16 support), fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from swarm.config.schema import ModelConfig

MAX_AUTO_BATCH = 64
HEADROOM = 0.8  # share of the free memory a step may take
CPU_PROBE_BATCHES = (1, 4)  # CPU: peak memory is measured at these sizes and extrapolated linearly
MAX_CPU_STEP_SECONDS = 2.0  # CPU: a larger batch only makes steps slower (and a peer slower to answer SIGTERM)


@dataclass
class StepCost:
    batch_size: int
    seconds: float  # one training step, after a warm-up step
    peak_bytes: int  # memory the step took beyond what was in use before it (model and optimizer included on CPU)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``training.precision`` (``auto``: bf16 on CUDA devices that support it)."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return requested


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The forward pass's context: bfloat16 autocast for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, batch_size: int, seq_len: int,
                 device: torch.device, precision: str = "fp32", steps: int = 2) -> StepCost:
    """Run ``steps`` training steps on random bytes and return the last one's time and the peak memory.

    :raises torch.OutOfMemoryError: the step does not fit (CUDA).
    """
    before = _peak_bytes(device)
    tokens = torch.randint(0, 256, (batch_size, seq_len + 1), device=device)
    seconds = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        with autocast(device, precision):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return StepCost(batch_size, seconds, max(0, _peak_bytes(device) - before))


def choose_batch_size(build: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]], *, seq_len: int,
                      device: torch.device, precision: str = "fp32") -> StepCost:
    """The largest power-of-two batch up to :data:`MAX_AUTO_BATCH` whose step fits :data:`HEADROOM` of the
    free memory, measured on ``build()``'s fresh model and optimizer; at least 1."""
    free = free_memory(device)
    if device.type == "cuda":
        batch = MAX_AUTO_BATCH
        while True:
            model, optimizer = build()
            try:
                torch.cuda.reset_peak_memory_stats(device)
                cost = measure_step(model, optimizer, batch_size=batch, seq_len=seq_len, device=device,
                                    precision=precision)
                if cost.peak_bytes <= HEADROOM * free or batch == 1:
                    return cost
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
            finally:
                del model, optimizer
                torch.cuda.empty_cache()
            batch //= 2
    # CPU (and MPS): the process's peak resident memory only grows (loading the data may have set it
    # already), so a measured difference can read as nothing: take the larger of it and an estimate of
    # the activations, and bound the step time as well as the memory
    model, optimizer = build()
    small, large = (measure_step(model, optimizer, batch_size=size, seq_len=seq_len, device=device,
                                 precision=precision) for size in CPU_PROBE_BATCHES)
    measured = max(large.peak_bytes - small.peak_bytes, 0) / (CPU_PROBE_BATCHES[1] - CPU_PROBE_BATCHES[0])
    per_sample = max(measured, activation_bytes(model.config))
    fixed = 16 * sum(p.numel() for p in model.parameters())  # fp32 parameters, gradients, Adam's two moments
    seconds_per_sample = large.seconds / large.batch_size
    batch = MAX_AUTO_BATCH
    while batch > 1 and (fixed + per_sample * batch > HEADROOM * free
                         or seconds_per_sample * batch > MAX_CPU_STEP_SECONDS):
        batch //= 2
    return StepCost(batch, seconds_per_sample * batch, int(fixed + per_sample * batch))


def activation_bytes(model: ModelConfig) -> int:
    """About how many bytes one sample's activations take in a training step (fp32): per layer and
    position about 16 values of the width (attention projections, MLP, norms, residuals) and three
    attention maps; then the logits, their softmax and their gradient."""
    per_layer = 16 * model.d_model + 3 * model.n_heads * model.seq_len
    return 4 * model.seq_len * (model.n_layers * per_layer + 3 * 256)


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (CUDA), or available to processes (``MemAvailable``; 0 if unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
