"""Error feedback around a per-tensor codec: what compression dropped is sent in a later round.

Without it a lossy codec's error adds up over steps (a biased quantizer makes the same error every
step, so the sum of what was sent drifts from the sum of the true updates linearly in the number
of steps). With it, ``sum(tensors) - sum(sent) == residual`` at every step, and the residual stays
as small as one step's compression error.

Usage, once per tensor per round (``key`` names the tensor; it must keep its shape)::

    ef = ErrorFeedback(make_codec("blockwise8"), enabled=True)
    payload, sent = ef.compress(index, tensor)     # payload: hivemind runtime_pb2.Tensor to send
    ...                                            # receivers: deserialize_torch_tensor(payload)
    metrics["residual_norm"] = ef.residual_norm()

The price of error feedback is one decode of our own payload per tensor (the benchmark measures it)
and one fp32 residual per tensor in memory.
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence

import torch
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm.compression.residuals import make_residual_memory


def codec_input_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is handed to a hivemind codec in.

    bf16 goes as fp32: hivemind's fp16 codecs reject bf16, its NoCompression sends bf16 as fp32
    anyway (USE_LEGACY_BFLOAT16) and its 8-bit codecs convert to fp32 first, so this costs no bytes.
    """
    return torch.float32 if dtype == torch.bfloat16 else dtype


class ErrorFeedback:
    """Compress tensors with ``codec``, adding to each what compression dropped from it last time.

    :param codec: a per-tensor codec, e.g. from :func:`swarm.compression.make_codec`.
    :param enabled: False turns the memory off (a null object): ``compress`` then sends each tensor
      as the codec alone would. Turn it off for lossless codecs (``none``), where it only costs time.
    """

    def __init__(self, codec: CompressionBase, *, enabled: bool = True):
        self.codec = codec
        self.memory = make_residual_memory(enabled)

    @property
    def enabled(self) -> bool:
        return self.memory.enabled

    def compress(
        self, key: Hashable, tensor: torch.Tensor, *, info: Optional[CompressionInfo] = None
    ) -> tuple[runtime_pb2.Tensor, torch.Tensor]:
        """Compress ``tensor + residual[key]``; return the payload and the value the peers will decode.

        The returned value is exactly what ``deserialize_torch_tensor(payload)`` gives a receiver
        (on ``tensor``'s device; its dtype is the payload's, i.e. ``tensor``'s, fp32 for bf16).
        :param info: what hivemind's codecs are told about the tensor; by default it describes
          ``tensor`` itself. Pass the whole tensor's info when ``tensor`` is one part of it, so that
          ``adaptive`` decides on the whole tensor's size as hivemind's all-reduce does.
        """
        target = self.memory.corrected(key, tensor)
        codec_input = target.to("cpu", codec_input_dtype(tensor.dtype))
        payload = self.codec.compress(codec_input, info or CompressionInfo.from_tensor(codec_input, key=key))
        sent = deserialize_torch_tensor(payload)
        self.memory.update(key, target, sent)
        return payload, sent.to(tensor.device)

    def compress_all(self, tensors: Sequence[torch.Tensor]) -> tuple[list[runtime_pb2.Tensor], list[torch.Tensor]]:
        """:meth:`compress` each tensor, keyed by its index in ``tensors``."""
        payloads, sent = [], []
        for index, tensor in enumerate(tensors):
            payload, value = self.compress(index, tensor)
            payloads.append(payload)
            sent.append(value)
        return payloads, sent

    def residual_norms(self) -> dict[Hashable, float]:
        """L2 norm of each key's residual (empty when disabled), for metrics."""
        return self.memory.norms()

    def residual_norm(self) -> float:
        """L2 norm of all residuals together (0.0 when disabled), for metrics."""
        return self.memory.total_norm()

    @property
    def discarded(self) -> int:
        """How many residuals were thrown away (shape changed or not finite); see ResidualMemory."""
        return self.memory.discarded

    def reset(self) -> None:
        """Forget every residual, e.g. after this peer loaded the swarm's state from another peer."""
        self.memory.reset()
