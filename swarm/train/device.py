"""Pick the compute device: CUDA, then Apple's MPS, then the CPU, unless the config forces one."""

from __future__ import annotations

import torch

from swarm.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    """:param requested: ``auto``, ``cpu``, ``cuda`` or ``mps`` (training.device).

    :raises ConfigError: a forced device is not available on this machine.
    """
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    if requested == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(requested, False):
        usable = ", ".join(name for name, ok in available.items() if ok)
        raise ConfigError(f"training.device: {requested!r} is not available on this machine (available: {usable})")
    return torch.device(requested)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe_device(device: torch.device) -> str:
    """A short name for metrics, e.g. ``cpu`` or ``cuda:0 NVIDIA H100 80GB HBM3`` (at most 64 characters)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"[:64]
    return str(device)[:64]
