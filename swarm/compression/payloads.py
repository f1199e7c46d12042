"""Decoding what another peer sent: every length and size is checked before any decoder sees a byte.

A payload (hivemind's ``runtime_pb2.Tensor``) names its own codec, and hivemind's decoders trust the
lengths inside it: bitsandbytes' blockwise kernel reads out of bounds when the absmax or codebook
lengths do not match the data, so an 84-byte payload crashes the process (SIGSEGV) before any check
after decoding could run. :func:`decode_payload` accepts only the codecs the caller accepts and only a
buffer whose layout is exactly what that codec writes for the announced shape; anything else raises
:class:`PayloadError`. Swarm's own ``sparse`` format is checked likewise, by
:func:`swarm.compression.sparse.check_layout`. ``tests/test_payloads.py`` sends thousands of random and mutated payloads
through it in a separate process.
"""

from __future__ import annotations

import math
from typing import Collection, Optional

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm.compression import sparse

MAX_DIMS = 8
BLOCKWISE_BLOCK = 4096  # hivemind 1.1.12's _BLOCKWISE_QUANTIZATION_BLOCKSIZE
BLOCKWISE_CODEBOOK = 256  # bitsandbytes' dynamic map: one entry per uint8 value
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
RAW_DTYPES = FLOAT_DTYPES | {"int64", "int32", "int16", "int8", "uint8", "bool"}  # optimizer state may hold them
_ITEMSIZE = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}
_TYPES = runtime_pb2.CompressionType


class PayloadError(ValueError):
    """A payload that does not follow its codec's layout, or uses a codec this peer does not accept."""


def codec_of(payload: runtime_pb2.Tensor) -> str:
    if payload.compression == sparse.SPARSE_WIRE:
        return sparse.SPARSE_WIRE_NAME
    return _TYPES.Name(payload.compression) if payload.compression in _TYPES.values() else f"#{payload.compression}"


def decode_payload(payload: runtime_pb2.Tensor, *, accepted: Collection[str], numel: Optional[int] = None,
                   max_numel: int = 1 << 31) -> torch.Tensor:
    """The tensor in ``payload``, after checking it can be decoded safely.

    :param accepted: codec names (``runtime_pb2.CompressionType`` names, e.g. ``NONE``, ``BLOCKWISE_8BIT``)
      this peer accepts; see :func:`swarm.compression.registry.wire_codecs`.
    :param numel: the number of values the caller expects, if it knows.
    :raises PayloadError: the payload is refused; nothing was decoded.
    """
    codec = codec_of(payload)
    if codec not in accepted:
        raise PayloadError(f"codec {codec} is not accepted here (accepted: {', '.join(sorted(accepted))})")
    size = list(payload.size)
    if len(size) > MAX_DIMS or any(dim < 0 for dim in size):
        raise PayloadError(f"bad shape {size[:MAX_DIMS + 1]}")
    count = math.prod(size)
    if count > max_numel or (numel is not None and count != numel):
        raise PayloadError(f"{count} values, expected {numel if numel is not None else f'at most {max_numel}'}")
    dtypes = RAW_DTYPES if codec == "NONE" else FLOAT_DTYPES
    if payload.dtype not in dtypes:
        raise PayloadError(f"dtype {payload.dtype[:20]!r} is not accepted with codec {codec}")
    if codec == sparse.SPARSE_WIRE_NAME:  # swarm's own format: checked and decoded by its module
        return sparse.decode(payload, sparse.check_layout(payload))
    expected = _expected_bytes(codec, payload, size, count)
    if len(payload.buffer) != expected:
        raise PayloadError(f"{len(payload.buffer)} bytes where codec {codec} writes {expected} for shape {size}")
    try:
        return deserialize_torch_tensor(payload)
    except (ValueError, TypeError, RuntimeError, IndexError) as e:  # layout checked: a decoder's own refusal
        raise PayloadError(f"undecodable {codec} payload: {e}") from None


def _expected_bytes(codec: str, payload: runtime_pb2.Tensor, size: list[int], count: int) -> int:
    buffer = payload.buffer
    if codec == "NONE":
        itemsize = _ITEMSIZE[payload.dtype]
        if payload.dtype == "bfloat16" and count and len(buffer) == 4 * count:
            return 4 * count  # hivemind's legacy format: bfloat16 sent as float32
        return itemsize * count
    if codec == "FLOAT16":
        return 2 * count
    if codec == "MEANSTD_16BIT":
        if not size or size[-1] == 0:
            raise PayloadError("a scaled-fp16 payload needs a non-empty last dimension")
        return 2 * count + 2 * 4 * (count // size[-1])
    if codec in ("UNIFORM_8BIT", "QUANTILE_8BIT"):
        codebook = _header(buffer, 1)[0]
        if not 1 <= codebook <= 256:
            raise PayloadError(f"codebook of {codebook} entries")
        expected = 8 + 4 * codebook + count
        if len(buffer) == expected and count and int(np.frombuffer(buffer, np.uint8, offset=expected - count).max()) >= codebook:
            raise PayloadError("an index beyond the codebook")
        return expected
    if codec == "BLOCKWISE_8BIT":
        absmax, codebook = _header(buffer, 2)
        blocks = -(-count // BLOCKWISE_BLOCK)
        if count == 0 or absmax != blocks or codebook != BLOCKWISE_CODEBOOK:
            raise PayloadError(f"{absmax} block scales and a codebook of {codebook} for {count} values "
                               f"(expected {blocks} and {BLOCKWISE_CODEBOOK})")
        return 16 + 4 * (absmax + codebook) + count
    raise PayloadError(f"codec {codec} is not supported")


def _header(buffer: bytes, fields: int) -> list[int]:
    if len(buffer) < 8 * fields:
        raise PayloadError("a payload shorter than its header")
    return [int(value) for value in np.frombuffer(buffer, dtype=np.int64, count=fields)]
