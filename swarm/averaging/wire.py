"""What travels between peers: small msgpack metadata and tensors split into chunks.

Messages reuse hivemind's ``runtime_pb2.ExpertRequest``/``ExpertResponse`` (a ``metadata`` bytes
field and a list of tensors), so the project needs no protobuf code of its own. A response stream
may carry heartbeats (metadata ``{"hb": 1}``, no tensors) while the answering peer waits for its
data; the caller treats ``chunk_timeout`` seconds without any message as a dead peer, and heartbeats
alone for longer than its ``patience`` as a stalled one (a peer that heartbeats but never delivers
would otherwise hold the caller until its round's timeout).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import STREAMING_CHUNK_SIZE_BYTES, combine_from_streaming, split_for_streaming

HEARTBEAT = {"hb": 1}
MAX_METADATA_BYTES = 1 << 16  # metadata is small by design; anything larger is a hostile or broken peer
CHUNK_BYTES = STREAMING_CHUNK_SIZE_BYTES  # tensor bytes per message over libp2p (hivemind's 64 KiB)


class ProtocolError(Exception):
    """A peer sent something that does not follow the protocol (or reported an error)."""


class Stalled(ProtocolError):
    """A peer sent heartbeats alone, no data, for longer than the caller's patience."""


class StreamEnded(ProtocolError):
    """A stream ended before all it announced had arrived. hivemind reads a reset libp2p stream as a
    clean end, so this is what a stream broken off in transit looks like: worth asking again."""


def request(**fields: Any) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps(fields))


def response(tensor_chunk: Optional[runtime_pb2.Tensor] = None, **fields: Any) -> runtime_pb2.ExpertResponse:
    tensors = [tensor_chunk] if tensor_chunk is not None else []
    return runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(fields), tensors=tensors)


async def parse_responses(bodies: AsyncIterator[bytes]) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Responses from serialized bodies (a direct link's, :mod:`swarm.net.direct`, bounded in size there)."""
    async for body in bodies:
        try:
            yield runtime_pb2.ExpertResponse.FromString(body)
        except Exception:  # protobuf's DecodeError, or worse on garbage
            raise ProtocolError("an undecodable message") from None


def metadata_of(message) -> dict:
    if len(message.metadata) > MAX_METADATA_BYTES:
        raise ProtocolError(f"metadata of {len(message.metadata)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        fields = MSGPackSerializer.loads(message.metadata) if message.metadata else {}
    except Exception as e:  # msgpack raises many types on garbage; all mean the same here
        raise ProtocolError(f"undecodable metadata: {e!r}") from None
    if not isinstance(fields, dict):
        raise ProtocolError("metadata is not a mapping")
    return fields


def tensor_messages(payloads: list[runtime_pb2.Tensor], *, chunk_bytes: int = CHUNK_BYTES,
                    **header: Any) -> Iterator[runtime_pb2.ExpertResponse]:
    """A header message (with ``count``), then every payload split into chunks of ``chunk_bytes``."""
    yield response(count=len(payloads), **header)
    for payload in payloads:
        for chunk in split_for_streaming(payload, chunk_bytes):
            yield response(chunk)


async def read_tensor_messages(
    stream: AsyncIterator[runtime_pb2.ExpertResponse], *, max_bytes: int, patience: Optional[float] = None,
    on_bytes: Optional[Callable[[int], None]] = None,
) -> tuple[dict, list[runtime_pb2.Tensor]]:
    """Inverse of :func:`tensor_messages`, skipping heartbeats.

    :param max_bytes: refuse streams whose tensor data exceeds this (a hostile or confused peer).
    :param patience: seconds of heartbeats alone (since the call, or since the last message that was
      not a heartbeat) after which the stream is given up; None: heartbeats are skipped without limit.
      Silence is the caller's to bound (e.g. ``aiter_with_timeout``).
    :param on_bytes: called with the bytes of tensor data received so far after each accepted chunk
      (progress of a long download); it runs on the reading loop, so it must be quick.
    :raises Stalled: heartbeats alone for longer than ``patience``.
    :raises ProtocolError: on an error reply, a malformed stream or too much data.
    """
    header: Optional[dict] = None
    payloads: list[runtime_pb2.Tensor] = []
    current: list[runtime_pb2.Tensor] = []
    expected_chunks, received_bytes = 0, 0
    async for message in _with_patience(stream, patience):
        if not message.tensors:
            fields = metadata_of(message)
            if fields == HEARTBEAT:
                continue
            if "error" in fields:
                raise ProtocolError(str(fields["error"])[:200])
            if header is not None:
                raise ProtocolError("a second header in one stream")
            header = fields
            continue
        if header is None:
            raise ProtocolError("tensor data before the header")
        chunk = message.tensors[0]
        received_bytes += len(chunk.buffer)
        if received_bytes > max_bytes:
            raise ProtocolError(f"more than {max_bytes} bytes of tensor data")
        if on_bytes is not None:
            on_bytes(received_bytes)
        if not current:
            if chunk.chunks <= 0:
                raise ProtocolError("a tensor without a chunk count")
            expected_chunks = chunk.chunks
        current.append(chunk)
        if len(current) == expected_chunks:
            payloads.append(combine_from_streaming(current))
            current = []
    if current:
        raise StreamEnded("the stream ended in the middle of a tensor")
    if header is None:
        raise StreamEnded("the stream ended without a header")
    if len(payloads) != header.get("count", -1):
        raise StreamEnded(f"expected {header.get('count')} tensors, received {len(payloads)}")
    return header, payloads


async def _with_patience(stream: AsyncIterator, patience: Optional[float]) -> AsyncIterator:
    """``stream``'s messages; :class:`Stalled` once heartbeats alone have come for ``patience`` seconds.
    The wait for each message is cut at the deadline, so a peer cannot stretch it by heartbeating slowly."""
    iterator = stream.__aiter__()
    progress = time.monotonic()  # of the call, then of the latest message that was not a heartbeat
    while True:
        try:
            if patience is None:
                message = await iterator.__anext__()
            else:
                message = await asyncio.wait_for(iterator.__anext__(), max(0.0, progress + patience - time.monotonic()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:  # this deadline, or the caller's bound on silence, whichever came first
            if patience is not None and time.monotonic() >= progress + patience:
                raise Stalled(f"heartbeats alone for {patience:.1f}s, no data") from None
            raise
        if message.tensors or metadata_of(message) != HEARTBEAT:
            progress = time.monotonic()
        yield message
