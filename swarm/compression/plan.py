"""Which codec each averaged tensor travels with, plus error feedback and PowerSGD.

The all-reduce compresses each part it sends; this plan tells it which codec a tensor gets
(:func:`~swarm.compression.registry.codec_chooser`), keeps the error-feedback residuals (what
compression dropped from this peer's contribution, added to the next one:
:class:`~swarm.compression.residuals.ResidualMemory`, the one error-feedback implementation), and
routes ``powersgd`` through its two low-rank all-reduces.
"""

from __future__ import annotations

from typing import Callable

import torch
from hivemind.compression import CompressionBase, CompressionInfo

from swarm.compression.powersgd import PowerSGD
from swarm.compression.registry import (
    DEFAULT_ADAPTIVE_THRESHOLD,
    DEFAULT_SPARSE_BITS,
    DEFAULT_SPARSE_FRACTION,
    codec_chooser,
    validate_codec_name,
)
from swarm.compression.residuals import make_residual_memory

# allreduce(tensors, phase, choose_codec) -> (averaged tensors, this peer's contribution as others decode it)
AllreduceFn = Callable[[list[torch.Tensor], int, Callable[[torch.Tensor], CompressionBase]],
                       tuple[list[torch.Tensor], list[torch.Tensor]]]


class CompressionPlan:
    """:param codec: a name from :data:`~swarm.compression.registry.CODEC_NAMES`.
    :param error_feedback: keep what compression dropped and add it to the next contribution (not for
      ``none``, which drops nothing; ``powersgd`` keeps its own, see :class:`PowerSGD`).
    :param powersgd_rank: rank of PowerSGD's factors (``codec: powersgd`` only).
    :param adaptive_threshold: ``codec: adaptive`` sends tensors under this many values in fp16.
    :param sparse_fraction, sparse_bits: ``codec: sparse``: share of values sent and their bits."""

    def __init__(self, *, codec: str, error_feedback: bool = True, powersgd_rank: int = 4,
                 adaptive_threshold: int = DEFAULT_ADAPTIVE_THRESHOLD,
                 sparse_fraction: float = DEFAULT_SPARSE_FRACTION, sparse_bits: int = DEFAULT_SPARSE_BITS):
        self.name = validate_codec_name(codec)
        self._uncompressed = codec_chooser("none")
        self._powersgd = PowerSGD(rank=powersgd_rank, error_feedback=error_feedback) if codec == "powersgd" else None
        self.choose_codec = codec_chooser(codec, adaptive_threshold=adaptive_threshold,
                                          sparse_fraction=sparse_fraction, sparse_bits=sparse_bits) if self._powersgd is None \
            else self._uncompressed
        self.residuals = make_residual_memory(error_feedback and codec not in ("none", "powersgd"))

    def average(self, deltas: list[torch.Tensor], allreduce: AllreduceFn) -> list[torch.Tensor]:
        if self._powersgd is not None:
            phases = iter(range(1 << 30))
            return self._powersgd.average(deltas, lambda tensors: allreduce(tensors, next(phases), self._uncompressed)[0])
        contributions = [self.residuals.corrected(index, delta) for index, delta in enumerate(deltas)]
        averaged, sent = allreduce(contributions, 0, self.choose_codec)
        for index, (contribution, decoded) in enumerate(zip(contributions, sent)):
            self.residuals.update(index, contribution, decoded)
        return averaged

    def warm_up(self, tensors: list[torch.Tensor], values: int = 4096) -> None:
        """Compress and decode a piece of each codec these tensors get, once: a codec's first call loads
        its backend (bitsandbytes: seconds, more on a loaded machine), which would otherwise fall in the
        first round's all-reduce (with ``diloco.overlap``, competing with the inner steps for the CPU)."""
        seen = set()
        for tensor in tensors:
            codec = self.choose_codec(tensor)
            if type(codec) in seen:
                continue
            seen.add(type(codec))
            piece = tensor.detach().flatten()[:values].to("cpu", torch.float32)
            codec.extract(codec.compress(piece, CompressionInfo.from_tensor(piece)))

    def forget_residuals(self) -> None:
        """After adopting another state or averaging alone, old residuals no longer apply."""
        self.residuals.reset()
        if self._powersgd is not None:
            self._powersgd.reset()

    def residual_norm(self) -> float:
        return self._powersgd.residual_norm() if self._powersgd is not None else self.residuals.total_norm()
