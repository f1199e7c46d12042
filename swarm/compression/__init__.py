"""Gradient compression for averaging: codecs by name, error feedback, PowerSGD, a non-finite guard.

This package depends on hivemind and torch only (no other part of swarm), so the averager can use
it however it wires its config:

- :func:`make_codec` builds a per-tensor codec by its user-facing name (:data:`CODEC_NAMES`); the
  payloads are hivemind ``runtime_pb2.Tensor`` messages that :func:`decode` reads without knowing
  the codec.
- :class:`ErrorFeedback` wraps a per-tensor codec and re-sends what it dropped.
- :class:`PowerSGD` averages a list of tensors through two calls of a given all-reduce.
- :func:`check_finite` is the guard applied before sending and on receipt.
"""

from hivemind.compression import deserialize_torch_tensor as decode

from swarm.compression.error_feedback import ErrorFeedback
from swarm.compression.finite import check_finite, is_finite, nonfinite_indices
from swarm.compression.powersgd import AllReduce, PowerSGD, PowerSGDPlan, orthonormalize
from swarm.compression.registry import (
    CODEC_NAMES,
    DEFAULT_ADAPTIVE_THRESHOLD,
    LOW_RANK_CODEC_NAMES,
    PER_TENSOR_CODEC_NAMES,
    is_per_tensor,
    make_codec,
    validate_codec_name,
)
from swarm.compression.residuals import NoResidualMemory, ResidualMemory

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_ADAPTIVE_THRESHOLD",
    "LOW_RANK_CODEC_NAMES",
    "PER_TENSOR_CODEC_NAMES",
    "AllReduce",
    "ErrorFeedback",
    "NoResidualMemory",
    "PowerSGD",
    "PowerSGDPlan",
    "ResidualMemory",
    "check_finite",
    "decode",
    "is_finite",
    "is_per_tensor",
    "make_codec",
    "nonfinite_indices",
    "orthonormalize",
    "validate_codec_name",
]
