"""Which codec each averaged tensor travels with, plus error feedback and PowerSGD, from config.

The all-reduce compresses each part it sends; this plan tells it which codec a tensor gets, keeps
the error-feedback residuals (what compression dropped from this peer's contribution, added to the
next one), and routes ``powersgd`` through its two low-rank all-reduces.
"""

from __future__ import annotations

from typing import Callable

import torch
from hivemind.compression import CompressionBase

from swarm.compression import PowerSGD, make_codec
from swarm.compression.residuals import make_residual_memory
from swarm.config import AveragingConfig

# allreduce(tensors, phase, choose_codec) -> (averaged tensors, this peer's contribution as others decode it)
AllreduceFn = Callable[[list[torch.Tensor], int, Callable[[torch.Tensor], CompressionBase]],
                       tuple[list[torch.Tensor], list[torch.Tensor]]]


class CompressionPlan:
    def __init__(self, config: AveragingConfig):
        self.name = config.compression
        self.threshold = config.adaptive_threshold
        self._uncompressed = make_codec("none")
        if self.name == "adaptive":  # decided per tensor, so that small tensors keep fp16 precision
            self._small, self._large = make_codec("fp16"), make_codec("blockwise8")
        elif self.name != "powersgd":
            self._codec = make_codec(self.name)
        self._powersgd = PowerSGD(rank=config.powersgd_rank, error_feedback=config.error_feedback) \
            if self.name == "powersgd" else None
        self.residuals = make_residual_memory(config.error_feedback and self.name not in ("none", "powersgd"))

    def choose_codec(self, tensor: torch.Tensor) -> CompressionBase:
        if self.name == "adaptive":
            return self._small if tensor.numel() < self.threshold else self._large
        return self._codec

    def average(self, deltas: list[torch.Tensor], allreduce: AllreduceFn) -> list[torch.Tensor]:
        if self._powersgd is not None:
            phases = iter(range(1 << 30))
            return self._powersgd.average(
                deltas, lambda tensors: allreduce(tensors, next(phases), lambda tensor: self._uncompressed)[0])
        contributions = [self.residuals.corrected(index, delta) for index, delta in enumerate(deltas)]
        averaged, sent = allreduce(contributions, 0, self.choose_codec)
        for index, (contribution, decoded) in enumerate(zip(contributions, sent)):
            self.residuals.update(index, contribution, decoded)
        return averaged

    def forget_residuals(self) -> None:
        """After adopting another state or averaging alone, old residuals no longer apply."""
        self.residuals.reset()
        if self._powersgd is not None:
            self._powersgd.reset()

    def residual_norm(self) -> float:
        return self._powersgd.residual_norm() if self._powersgd is not None else self.residuals.total_norm()
