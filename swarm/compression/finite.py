"""The non-finite guard: a tensor with NaN or Inf must never reach, or come out of, an average.

The averager calls :func:`check_finite` on what it is about to send and on what it receives; a
failure is logged as a warning and counted by the caller, and the contribution is left out.
"""

from __future__ import annotations

from typing import Iterable

import torch


def nonfinite_indices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Indices of the tensors that hold at least one NaN or Inf (integer tensors never do)."""
    return [
        index
        for index, tensor in enumerate(tensors)
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if every value of every tensor is finite (no NaN, no +-Inf); True for no tensors."""
    return not nonfinite_indices(tensors)
