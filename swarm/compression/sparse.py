"""``sparse``: the top fraction of a tensor's values by magnitude, their positions and 2-8-bit values.

What compression drops (every value but the largest ``fraction``, and the rounding of those kept) goes
into the error-feedback residual (:class:`swarm.compression.residuals.ResidualMemory`, through
:class:`swarm.compression.plan.CompressionPlan`), so it is sent in a later round, not lost.

Payload (``runtime_pb2.Tensor``, ``compression`` = :data:`SPARSE_WIRE`, a number outside hivemind's enum:
hivemind's decoders never see it; :func:`swarm.compression.payloads.decode_payload` routes it here).
``dtype`` and ``size`` are the tensor's; the buffer, little-endian:

- header, 8 bytes: uint32 ``kept`` (values sent), uint8 ``bits`` (2, 4 or 8), uint8 index format, 2 zero bytes;
- block scales: per block of :data:`BLOCK` kept values, float32 ``low`` and ``high`` (their smallest and
  largest magnitude);
- positions, the smaller of (measured by ``benchmarks/codecs.py``'s sparse rows):
  ``CHUNKED`` (0): per chunk of 65536 positions a uint32 count, then each position's low 16 bits
  (2 bytes a value: best below 1 value in 16), or ``BITMAP`` (1): one bit per position (n / 8 bytes);
- values, ``bits`` each, packed from the low bits of each byte: a sign bit (the top one) and a magnitude
  level m in [0, 2^(bits-1) - 1], decoded as ``low + m (high - low) / (2^(bits-1) - 1)``. Kept values are the
  largest, so no level is spent on zero; at 2 bits a value is +-low or +-high of its block.

At 1 % kept and 4 bits that is about 0.01 x (2 + 0.5 + 0.06) = 0.026 bytes a value, against 1 for blockwise8.

:func:`check_layout` reads nothing beyond what the header and the shape allow and refuses a count over the
shape, positions out of range, repeated or out of order, scales that are not finite or not ordered, and
any length but the exact one (:class:`swarm.compression.payloads.PayloadError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2

from swarm.compression.registry import DEFAULT_SPARSE_BITS, DEFAULT_SPARSE_FRACTION, SPARSE_BITS, SPARSE_WIRE_NAME  # noqa: F401 (payloads reads it here)

SPARSE_WIRE = 64  # runtime_pb2.Tensor.compression of a sparse payload (proto3 keeps unknown enum values)
BLOCK = 256  # kept values per pair of scales
CHUNK = 1 << 16  # positions per count in the CHUNKED index format
CHUNKED, BITMAP = 0, 1
BITS = SPARSE_BITS
_HEADER = 8


@dataclass(frozen=True)
class Layout:
    """What a checked payload holds: where each section starts in the buffer."""

    count: int  # values of the tensor
    kept: int
    bits: int
    index_format: int
    scales_at: int
    index_at: int
    values_at: int
    size: int  # the exact buffer length


def index_bytes(count: int, kept: int, index_format: int) -> int:
    if index_format == CHUNKED:
        return 4 * -(-count // CHUNK) + 2 * kept
    return -(-count // 8)


def layout_of(count: int, kept: int, bits: int, index_format: int) -> Layout:
    scales_at = _HEADER
    index_at = scales_at + 8 * -(-kept // BLOCK)
    values_at = index_at + index_bytes(count, kept, index_format)
    return Layout(count, kept, bits, index_format, scales_at, index_at, values_at, values_at + -(-kept * bits // 8))


class SparseLowBit(CompressionBase):
    """Top ``fraction`` of the values by magnitude (at least one), ``bits`` bits each.

    :param fraction: share of the values sent, in (0, 1]. Lower sends fewer bytes and leaves more in the
      error-feedback residual (sent in later rounds); the residual's norm (a metric) shows when it is too low.
    :param bits: 2, 4 or 8 bits a kept value (sign included). 4 is the default; 2 halves the value bytes,
      whose rounding error also goes to the residual.
    """

    compression_type = SPARSE_WIRE

    def __init__(self, *, fraction: float = DEFAULT_SPARSE_FRACTION, bits: int = DEFAULT_SPARSE_BITS):
        if not 0 < fraction <= 1 or bits not in BITS:
            raise ValueError(f"sparse codec needs 0 < fraction <= 1 and bits in {BITS} (got {fraction}, {bits})")
        self.fraction, self.bits = fraction, bits

    def kept(self, count: int) -> int:
        return min(count, max(1, math.ceil(self.fraction * count)))

    def for_reduced(self, contributors: int) -> SparseLowBit:
        """The codec of a reducer's result: the sum of ``contributors`` sparse inputs has up to that many
        times their values, and an aggregate (mean or CenteredClip) is zero where all inputs are zero; keeping
        that many sends every non-zero value of the result (rounded, no residual at the reducer)."""
        return SparseLowBit(fraction=min(1.0, self.fraction * max(1, contributors)), bits=self.bits)

    def compress(self, tensor: torch.Tensor, info: CompressionInfo = None, allow_inplace: bool = False
                 ) -> runtime_pb2.Tensor:
        flat = tensor.detach().reshape(-1).float().cpu().numpy()
        count = flat.size
        kept = self.kept(count)
        if kept == count:
            positions = np.arange(count, dtype=np.int64)
        else:  # introselect, then sort the few kept (torch.topk + sort: 7x slower on 4M values)
            positions = np.sort(np.argpartition(np.abs(flat), count - kept)[count - kept:]).astype(np.int64)
        values = flat[positions]
        index_format = min((CHUNKED, BITMAP), key=lambda kind: index_bytes(count, kept, kind))
        scales, codes = _quantize(values, self.bits)
        header = np.array([kept], "<u4").tobytes() + bytes([self.bits, index_format, 0, 0])
        buffer = header + scales.tobytes() + _encode_positions(positions, count, index_format) + _pack(codes, self.bits)
        return runtime_pb2.Tensor(buffer=buffer, size=list(tensor.shape), dtype=str(tensor.dtype).replace("torch.", ""),
                                  compression=SPARSE_WIRE, requires_grad=False)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        """Decode a payload :func:`check_layout` accepted (call that first on anything received)."""
        return decode(serialized_tensor, check_layout(serialized_tensor))

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        count = info.descriptor.numel()
        return layout_of(count, self.kept(count), self.bits, CHUNKED).size / max(1, 4 * count)

    def __repr__(self) -> str:
        return f"SparseLowBit(fraction={self.fraction}, bits={self.bits})"


def check_layout(payload: runtime_pb2.Tensor) -> Layout:
    """The payload's layout, after checking every length and position in it; raises PayloadError."""
    from swarm.compression.payloads import PayloadError  # payloads routes sparse payloads here

    count, buffer = math.prod(payload.size), payload.buffer
    if len(buffer) < _HEADER:
        raise PayloadError("a sparse payload shorter than its header")
    kept = int(np.frombuffer(buffer, "<u4", count=1)[0])
    bits, index_format, pad = buffer[4], buffer[5], buffer[6:8]
    if bits not in BITS or index_format not in (CHUNKED, BITMAP) or pad != b"\0\0":
        raise PayloadError(f"sparse payload header: {bits} bits, index format {index_format}")
    if kept > count or (count and not kept):
        raise PayloadError(f"sparse payload keeps {kept} of {count} values")
    layout = layout_of(count, kept, bits, index_format)
    if len(buffer) != layout.size:
        raise PayloadError(f"{len(buffer)} bytes where a sparse payload of {kept}/{count} values at {bits} bits "
                           f"writes {layout.size}")
    scales = np.frombuffer(buffer, "<f4", count=2 * -(-kept // BLOCK), offset=layout.scales_at).reshape(-1, 2)
    if not np.isfinite(scales).all() or (scales[:, 0] < 0).any() or (scales[:, 1] < scales[:, 0]).any():
        raise PayloadError("sparse payload scales are not finite, negative or out of order")
    _decode_positions(buffer, layout)  # raises on positions out of range, repeated or out of order
    return layout


def decode(payload: runtime_pb2.Tensor, layout: Layout) -> torch.Tensor:
    """The dense tensor of a payload whose ``layout`` :func:`check_layout` returned."""
    buffer, kept = payload.buffer, layout.kept
    scales = np.frombuffer(buffer, "<f4", count=2 * -(-kept // BLOCK), offset=layout.scales_at).reshape(-1, 2)
    positions = _decode_positions(buffer, layout)
    codes = np.frombuffer(buffer, np.uint8, count=layout.size - layout.values_at, offset=layout.values_at)
    values = _dequantize(_unpack(codes, layout.bits, kept), scales, layout.bits)
    dense = np.zeros(layout.count, np.float32)
    dense[positions] = values
    dtype = getattr(torch, payload.dtype)
    return torch.from_numpy(dense).to(dtype).reshape(tuple(payload.size))


def _quantize(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    levels = (1 << (bits - 1)) - 1
    blocks = -(-values.size // BLOCK)
    padded = np.zeros(blocks * BLOCK, np.float32)
    padded[:values.size] = np.abs(values)
    mask = np.zeros(blocks * BLOCK, bool)
    mask[:values.size] = True
    magnitudes, mask = padded.reshape(blocks, BLOCK), mask.reshape(blocks, BLOCK)
    low = np.where(mask, magnitudes, np.inf).min(axis=1)
    high = magnitudes.max(axis=1)
    scales = np.stack([low, high], axis=1).astype("<f4")
    span = (high - low)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(span > 0, np.rint((magnitudes - low[:, None]) / span * levels), 0)
    level = np.clip(level, 0, levels).astype(np.uint8).reshape(-1)[:values.size]
    sign = (values < 0).astype(np.uint8) << (bits - 1)
    return scales, sign | level


def _dequantize(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    levels = (1 << (bits - 1)) - 1
    block = np.arange(codes.size) // BLOCK
    low, high = scales[block, 0].astype(np.float32), scales[block, 1].astype(np.float32)
    magnitude = low + (codes & levels).astype(np.float32) * ((high - low) / levels)
    return np.where(codes >> (bits - 1) & 1, -magnitude, magnitude).astype(np.float32)


def _pack(codes: np.ndarray, bits: int) -> bytes:
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, np.uint8)
    padded[:codes.size] = codes
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8).tobytes()


def _unpack(packed: np.ndarray, bits: int, kept: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:kept].astype(np.uint8)


def _encode_positions(positions: np.ndarray, count: int, index_format: int) -> bytes:
    if index_format == BITMAP:
        bitmap = np.zeros(-(-count // 8) * 8, np.uint8)
        bitmap[positions] = 1
        return np.packbits(bitmap, bitorder="little").tobytes()
    counts = np.bincount(positions // CHUNK, minlength=-(-count // CHUNK)).astype("<u4")
    return counts.tobytes() + (positions % CHUNK).astype("<u2").tobytes()


def _decode_positions(buffer: bytes, layout: Layout) -> np.ndarray:
    from swarm.compression.payloads import PayloadError

    count, kept = layout.count, layout.kept
    if layout.index_format == BITMAP:
        bitmap = np.frombuffer(buffer, np.uint8, count=-(-count // 8), offset=layout.index_at)
        positions = np.flatnonzero(np.unpackbits(bitmap, bitorder="little"))
        if positions.size != kept or (kept and positions[-1] >= count):
            raise PayloadError(f"sparse payload bitmap marks {positions.size} positions (up to "
                               f"{positions[-1] if positions.size else -1}) for {kept} kept of {count}")
        return positions
    chunks = -(-count // CHUNK)
    counts = np.frombuffer(buffer, "<u4", count=chunks, offset=layout.index_at).astype(np.int64)
    if counts.sum() != kept:
        raise PayloadError(f"sparse payload chunk counts add up to {int(counts.sum())}, not {kept}")
    low = np.frombuffer(buffer, "<u2", count=kept, offset=layout.index_at + 4 * chunks).astype(np.int64)
    positions = low + np.repeat(np.arange(chunks, dtype=np.int64) * CHUNK, counts)
    if (np.diff(positions) <= 0).any():  # a chunk's positions lie below the next chunk's: one global order
        raise PayloadError("sparse payload positions repeat or are out of order")
    if kept and positions[-1] >= count:
        raise PayloadError(f"sparse payload position {int(positions[-1])} beyond {count} values")
    return positions
