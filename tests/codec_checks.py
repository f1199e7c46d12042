"""Shared by the compression tests: the real wire format and error measures."""

from __future__ import annotations

import torch
from hivemind.compression import CompressionInfo
from hivemind.compression import deserialize_torch_tensor as decode  # noqa: F401 (hivemind's own decoder, for tests)
from hivemind.proto import runtime_pb2

from swarm.compression.payloads import decode_payload
from swarm.compression.registry import SPARSE_WIRE_NAME

EVERY_WIRE_CODEC = frozenset({*runtime_pb2.CompressionType.keys(), SPARSE_WIRE_NAME})

# Relative error ||x - decode(encode(x))|| / ||x|| on N(0, 1) data: measured values are about
# 3e-4 (fp16), 0.016 (uint8), 0.026 (quantile8), 0.013 (blockwise8); the bounds leave a margin.
RELATIVE_ERROR_BOUND = {
    "none": 0.0,
    "fp16": 1e-3,
    "scaled-fp16": 1e-3,
    "uint8": 0.05,
    "quantile8": 0.05,
    "blockwise8": 0.03,
    "adaptive": 0.03,  # fp16 below the threshold, blockwise8 above
    # top 1 % of N(0, 1) holds 8.5 % of its energy: sqrt(1 - 0.085) = 0.957 (what it drops waits in the residual)
    "sparse": 0.97,
}
# Payload bytes / fp32 bytes on a 1024 x 1024 tensor (the codebooks and block scales included).
SIZE_RATIO_BOUND = {
    "none": 1.001,
    "fp16": 0.501,
    "scaled-fp16": 0.505,
    "uint8": 0.252,
    "quantile8": 0.252,
    "blockwise8": 0.252,
    "adaptive": 0.252,
    "sparse": 0.0064,  # 1 % of the values, 2 bytes of position and 4 bits each, 8 bytes of scales per 256
}


def over_the_wire(payload: runtime_pb2.Tensor) -> torch.Tensor:
    """What a receiving peer decodes: the payload as bytes, parsed back, then checked and deserialized
    (swarm's decode_payload: hivemind's decoder does not know swarm's own sparse format)."""
    return decode_payload(runtime_pb2.Tensor.FromString(payload.SerializeToString()), accepted=EVERY_WIRE_CODEC)


def encode(codec, tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor))


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximation.double() - exact.double()).norm() / exact.double().norm())


