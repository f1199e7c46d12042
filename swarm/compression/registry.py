"""The one place that maps the user-facing codec names to codecs.

Every per-tensor codec is one of hivemind's public ``CompressionBase`` classes (or hivemind's own
``SizeAdaptiveCompression`` composing two of them), so the wire format is hivemind's
``runtime_pb2.Tensor`` and any peer decodes any payload with ``deserialize_torch_tensor``, without
knowing which codec the sender chose.

``powersgd`` is a name of the same list but not a per-tensor codec: it compresses a whole set of
tensors through two all-reduce rounds, see :class:`swarm.compression.powersgd.PowerSGD`.

Sizes on the wire (payload bytes, fp32 input of n values; measured by ``benchmarks/codecs.py``):
``none`` 4n, ``fp16`` and ``scaled-fp16`` 2n (scaled-fp16 adds 8 bytes per row of the last axis),
``uint8`` and ``quantile8`` n + 1 KiB (a 256-entry fp32 codebook), ``blockwise8`` n + 1 KiB +
4 bytes per block of 4096 values, ``sparse`` (the top ``sparse_fraction`` f of the values, ``sparse_bits``
b bits each, see :mod:`swarm.compression.sparse`) about f n (2 + b / 8) + 8 f n / 256 bytes (positions as
16-bit offsets; n / 8 bytes of bitmap instead once f is over about 1/16). An 8-bit codec therefore makes tensors of fewer than about 350
values *larger* than raw fp32: that is what ``adaptive`` is for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # hivemind is imported when a codec is built, so that the config can list names fast
    import torch
    from hivemind.compression import CompressionBase

# Tensors with fewer values go raw whatever the codec: hivemind 1.1.12's uint8 and quantile8 raise
# on empty tensors and scaled-fp16 raises on 0-d ones, and a value or two costs nothing to send.
MIN_VALUES_TO_COMPRESS = 2

# hivemind's own examples use 2**16: below it the 1 KiB codebook of an 8-bit codec is not worth it.
DEFAULT_ADAPTIVE_THRESHOLD = 2**16

# name -> hivemind.compression class name
_PER_TENSOR: dict[str, str] = {
    "none": "NoCompression",
    "fp16": "Float16Compression",
    "scaled-fp16": "ScaledFloat16Compression",
    "uint8": "Uniform8BitQuantization",
    "quantile8": "Quantile8BitQuantization",
    "blockwise8": "BlockwiseQuantization",
}

SPARSE_WIRE_NAME = "SPARSE_LOWBIT"  # swarm's own payload format, not one of hivemind's (see swarm.compression.sparse)
DEFAULT_SPARSE_FRACTION, DEFAULT_SPARSE_BITS = 0.01, 4
SPARSE_BITS = (2, 4, 8)

# the payload formats (hivemind ``CompressionType`` names) each codec writes; NONE for tensors too small to compress
_WIRE: dict[str, str] = {"none": "NONE", "fp16": "FLOAT16", "scaled-fp16": "MEANSTD_16BIT", "uint8": "UNIFORM_8BIT",
                         "quantile8": "QUANTILE_8BIT", "blockwise8": "BLOCKWISE_8BIT", "sparse": SPARSE_WIRE_NAME}

# ``adaptive``: tensors under the threshold keep fp16 precision, larger ones go 8-bit
ADAPTIVE_SMALL, ADAPTIVE_LARGE = "fp16", "blockwise8"

PER_TENSOR_CODEC_NAMES: tuple[str, ...] = (*_PER_TENSOR, "adaptive", "sparse")
"""Names :func:`make_codec` builds: each compresses one tensor into one hivemind payload."""

LOW_RANK_CODEC_NAMES: tuple[str, ...] = ("powersgd",)
"""Names that compress a set of tensors through all-reduce rounds (built as ``PowerSGD``)."""

CODEC_NAMES: tuple[str, ...] = PER_TENSOR_CODEC_NAMES + LOW_RANK_CODEC_NAMES
"""Every accepted codec name, in the order the docs and the benchmark list them."""


def validate_codec_name(name: str) -> str:
    """Return ``name`` if it is a codec name; else raise ``ValueError`` listing the accepted ones."""
    if name not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; accepted: {', '.join(CODEC_NAMES)}")
    return name


def wire_codecs(name: str) -> frozenset[str]:
    """The payload formats a peer using codec ``name`` sends: the only ones its group accepts from it
    (see :func:`swarm.compression.payloads.decode_payload`)."""
    validate_codec_name(name)
    names = (ADAPTIVE_SMALL, ADAPTIVE_LARGE) if name == "adaptive" else (name,) if name in _WIRE else ()
    return frozenset({"NONE", *(_WIRE[codec] for codec in names)})


def is_per_tensor(name: str) -> bool:
    """True for a codec built by :func:`make_codec`, False for ``powersgd``; ValueError if unknown."""
    return validate_codec_name(name) in PER_TENSOR_CODEC_NAMES


def make_codec(name: str, *, adaptive_threshold: int = DEFAULT_ADAPTIVE_THRESHOLD,
               sparse_fraction: float = DEFAULT_SPARSE_FRACTION, sparse_bits: int = DEFAULT_SPARSE_BITS
               ) -> CompressionBase:
    """Build the per-tensor codec called ``name`` (one of :data:`PER_TENSOR_CODEC_NAMES`).

    :param adaptive_threshold: for ``adaptive`` only: tensors with fewer values than this go fp16,
      the others blockwise 8-bit. Raise it if small layers (norms, biases, embeddings of a small
      vocabulary) should keep fp16 precision; lower it to squeeze more bytes out of mid-sized ones.
      Note that inside hivemind's all-reduce the choice is made on the size of the whole tensor,
      not of the part being sent.
    :param sparse_fraction: for ``sparse`` only: the share of each part's values sent (the largest);
      the rest waits in the error-feedback residual. ``sparse`` is swarm's own payload format: only
      swarm's all-reduce (DiLoCo) decodes it, hivemind's (sync mode) cannot.
    :param sparse_bits: for ``sparse`` only: bits a kept value (2, 4 or 8).
    :raises ValueError: the name is unknown (the message lists the accepted names), or it is
      ``powersgd``, which is not a per-tensor codec.
    """
    validate_codec_name(name)
    if name in LOW_RANK_CODEC_NAMES:
        raise ValueError(
            f"{name!r} compresses a whole set of tensors through two all-reduce rounds, not one tensor "
            f"at a time: build it with swarm.compression.PowerSGD(rank=...); per-tensor codecs: "
            f"{', '.join(PER_TENSOR_CODEC_NAMES)}"
        )
    if adaptive_threshold < MIN_VALUES_TO_COMPRESS:
        raise ValueError(f"adaptive_threshold must be at least {MIN_VALUES_TO_COMPRESS}, got {adaptive_threshold}")
    if name == "sparse":  # handles tensors of any size itself (one value or none: sent whole)
        from swarm.compression.sparse import SparseLowBit

        return SparseLowBit(fraction=sparse_fraction, bits=sparse_bits)
    from hivemind import compression

    if name == "none":
        return compression.NoCompression()
    if name == "adaptive":
        lossy = compression.SizeAdaptiveCompression(
            threshold=adaptive_threshold, less=_build(ADAPTIVE_SMALL), greater_equal=_build(ADAPTIVE_LARGE))
    else:
        lossy = _build(name)
    return compression.SizeAdaptiveCompression(
        threshold=MIN_VALUES_TO_COMPRESS, less=compression.NoCompression(), greater_equal=lossy)


def codec_chooser(name: str, *, adaptive_threshold: int = DEFAULT_ADAPTIVE_THRESHOLD,
                  sparse_fraction: float = DEFAULT_SPARSE_FRACTION, sparse_bits: int = DEFAULT_SPARSE_BITS
                  ) -> Callable[[torch.Tensor], CompressionBase]:
    """For swarm's own all-reduce, which cuts every tensor into parts: tensor -> its codec.

    ``adaptive`` decides on the size of the whole tensor (as hivemind's all-reduce does with
    :func:`make_codec`'s ``adaptive``), not on the size of the part being sent. The same codec object
    is returned for every tensor that gets it, so the all-reduce can bucket tensors by codec.
    """
    if name == "adaptive":
        small, large = make_codec(ADAPTIVE_SMALL), make_codec(ADAPTIVE_LARGE)
        return lambda tensor: small if tensor.numel() < adaptive_threshold else large
    codec = make_codec(name, sparse_fraction=sparse_fraction, sparse_bits=sparse_bits)
    return lambda tensor: codec


def _build(name: str) -> CompressionBase:
    from hivemind import compression

    return getattr(compression, _PER_TENSOR[name])()
