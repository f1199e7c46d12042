"""Per-tensor memory of what compression dropped: the state behind error feedback.

:class:`ResidualMemory` keeps one residual per key; :class:`NoResidualMemory` is its null object,
so that code using error feedback reads the same whether it is switched on or off.
"""

from __future__ import annotations

import math
from typing import Hashable, Optional

import torch
from hivemind.utils import get_logger

from swarm.compression.finite import is_finite

logger = get_logger(__name__)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Residuals are kept in fp32 (fp64 for fp64 tensors): in fp16 or bf16 they would round away."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ResidualMemory:
    """One residual tensor per key (a tensor index, a parameter name, or a (tensor, part) pair).

    A residual lives on the device of the tensor it corrects, in :func:`accumulation_dtype`.
    A key must keep its shape; when it changes (a new model, a part split differently because the
    group changed size), the old residual cannot be added and is discarded with a warning.
    A residual that would be NaN or Inf (the tensor itself was not finite) is discarded likewise,
    so one bad step cannot poison every later one. Both events count in :attr:`discarded`.
    """

    enabled = True

    def __init__(self) -> None:
        self._residuals: dict[Hashable, torch.Tensor] = {}
        self.discarded = 0

    def corrected(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor + residual[key]`` in the accumulation dtype (a new tensor; the input is untouched)."""
        target = tensor.detach().to(accumulation_dtype(tensor.dtype), copy=True)
        residual = self._residuals.get(key)
        if residual is None:
            return target
        if residual.shape != target.shape:
            self._discard(key, f"its shape changed from {tuple(residual.shape)} to {tuple(target.shape)}")
            return target
        return target.add_(residual.to(target.device, target.dtype))

    def update(self, key: Hashable, target: torch.Tensor, sent: torch.Tensor) -> None:
        """Remember ``target - sent``: what the peers did not receive of ``target``."""
        residual = target - sent.detach().to(target.device, target.dtype)
        if not is_finite(residual):
            self._discard(key, "it is not finite")
            return
        self._residuals[key] = residual

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        """The residual kept for ``key``, or None."""
        return self._residuals.get(key)

    def norms(self) -> dict[Hashable, float]:
        """L2 norm of each residual, for metrics (a growing norm means the codec drops too much)."""
        return {key: float(residual.norm()) for key, residual in self._residuals.items()}

    def total_norm(self) -> float:
        """L2 norm of all residuals together."""
        return math.sqrt(sum(norm**2 for norm in self.norms().values()))

    def reset(self) -> None:
        """Forget every residual (e.g. after loading a checkpoint or a state download)."""
        self._residuals.clear()

    def _discard(self, key: Hashable, why: str) -> None:
        self._residuals.pop(key, None)
        self.discarded += 1
        logger.warning(f"Error feedback: discarded the residual of tensor {key!r} because {why}")


class NoResidualMemory:
    """Error feedback switched off: nothing is added, nothing is remembered."""

    enabled = False
    discarded = 0

    def corrected(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    def update(self, key: Hashable, target: torch.Tensor, sent: torch.Tensor) -> None:
        pass

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        return None

    def norms(self) -> dict[Hashable, float]:
        return {}

    def total_norm(self) -> float:
        return 0.0

    def reset(self) -> None:
        pass


def make_residual_memory(enabled: bool) -> ResidualMemory | NoResidualMemory:
    """The memory for error feedback switched on (``enabled=True``) or off."""
    return ResidualMemory() if enabled else NoResidualMemory()
