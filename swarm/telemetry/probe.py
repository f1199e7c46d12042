"""Probes a peer answers for `swarm doctor`: its clock, and bytes up and down.

Every non-client DHT node of a run serves them (:func:`install_probe`), inside its DHT process, under
one namespace for all runs (a doctor asks before it knows whether it has the right run). Anyone who
reaches the node may ask, so every probe is bounded: at most :data:`MAX_PROBE_BYTES` each way per
request, one probe per caller at a time and :data:`PROBES_PER_WINDOW` per caller per :data:`WINDOW`
seconds, and :data:`BYTES_PER_WINDOW` in all per window (an open run's identities are free, so the
total is what bounds the upload a node can be made to spend). Whether this peer can be reached is
not a probe: the dial-back of :mod:`swarm.net.reachability` decides it when the DHT starts.

:func:`probe_peer` is the caller's side; ``peers/doctor.py`` turns its findings into verdicts.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import hivemind
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time, get_logger

from swarm.averaging import wire

logger = get_logger(__name__)

MAX_PROBE_BYTES = 8 << 20  # bytes each way in one bandwidth probe
CHUNK_BYTES = 256 << 10
WINDOW = 60.0  # seconds
TIME_SAMPLES = 3  # time probes per peer
PROBES_PER_WINDOW = 8  # probes one caller may make per window (a doctor run makes 5 per peer)
BYTES_PER_WINDOW = 64 << 20  # bytes this node sends and receives for probes per window, all callers together


NAMESPACE = "swarm.probe"  # the same for every run: a doctor asks before it knows it has the right one


class ProbeServicer(ServicerBase):
    """The answering side (runs in the DHT's process): see the module docstring for its bounds."""

    def __init__(self):
        self._recent: dict[PeerID, deque] = defaultdict(deque)  # times of each caller's recent probes
        self._busy: set[PeerID] = set()
        self._spent: deque = deque()  # (time, bytes) of probe traffic in the current window

    async def rpc_probe(self, request: runtime_pb2.ExpertRequest, context: P2PContext
                        ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        fields = wire.metadata_of(request)
        refusal = self._admit(context.remote_id)
        if refusal:
            yield wire.response(error=refusal)
            return
        self._busy.add(context.remote_id)
        try:
            op = fields.get("op")
            if op == "time":
                yield wire.response(time=get_dht_time())
            elif op == "download":
                size = _bounded_size(fields.get("bytes"))
                self._spend(size)
                for start in range(0, size, CHUNK_BYTES):
                    yield wire.response(runtime_pb2.Tensor(buffer=bytes(min(CHUNK_BYTES, size - start))))
                yield wire.response(done=size)
            else:
                yield wire.response(error=f"unknown probe {str(op)[:32]!r}")
        finally:
            self._busy.discard(context.remote_id)

    async def rpc_upload(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                         ) -> runtime_pb2.ExpertResponse:
        refusal = self._admit(context.remote_id)
        if refusal:
            return wire.response(error=refusal)
        self._busy.add(context.remote_id)
        received, started = 0, time.monotonic()
        try:
            async for request in requests:
                received += sum(len(tensor.buffer) for tensor in request.tensors)
                if received > MAX_PROBE_BYTES:
                    return wire.response(error=f"more than {MAX_PROBE_BYTES} bytes")
        finally:
            self._busy.discard(context.remote_id)
            self._spend(received)
        return wire.response(received=received, seconds=time.monotonic() - started)

    def _admit(self, caller: PeerID) -> Optional[str]:
        now = time.monotonic()
        recent = self._recent[caller]
        while recent and recent[0] < now - WINDOW:
            recent.popleft()
        while self._spent and self._spent[0][0] < now - WINDOW:
            self._spent.popleft()
        if caller in self._busy:
            return "one probe at a time"
        if len(recent) >= PROBES_PER_WINDOW:
            return f"at most {PROBES_PER_WINDOW} probes per {WINDOW:g} s"
        if sum(size for _, size in self._spent) >= BYTES_PER_WINDOW:
            return "probe budget spent, try again in a minute"
        recent.append(now)
        if len(self._recent) > 4096:  # forget callers that went quiet, so the table stays small
            for peer in [peer for peer, times in self._recent.items() if not times]:
                del self._recent[peer]
        return None

    def _spend(self, size: int) -> None:
        self._spent.append((time.monotonic(), size))


def _bounded_size(value) -> int:
    return max(0, min(int(value), MAX_PROBE_BYTES)) if isinstance(value, int) else 0


async def _install(dht: hivemind.DHT, node) -> None:
    await ProbeServicer().add_p2p_handlers(node.p2p, namespace=NAMESPACE)


def install_probe(dht: hivemind.DHT, timeout: float = 10.0) -> None:
    """Serve the probes from this DHT node (a bootstrap peer or a trainer that accepts connections)."""
    if not dht.client_mode:
        dht.run_coroutine(_install, return_future=True).result(timeout)


@dataclass
class ProbeResult:
    """What one peer answered (None: not measured; ``error``: why)."""

    peer: str
    clock_offset: Optional[float] = None  # seconds the peer's clock is ahead of this one's
    clock_uncertainty: Optional[float] = None  # half the round trip: the offset is known to this much
    up_mbit: Optional[float] = None
    down_mbit: Optional[float] = None
    error: Optional[str] = None


async def probe_peer(p2p: P2P, peer: PeerID, *, probe_bytes: int,
                     timeout: float) -> ProbeResult:
    """Ask ``peer`` for its time and ``probe_bytes`` up and down."""
    stub = ProbeServicer.get_stub(p2p, peer, namespace=NAMESPACE)
    result = ProbeResult(peer=peer.to_base58())
    try:
        for _ in range(TIME_SAMPLES):  # the quickest exchange bounds the offset best (as NTP does)
            sent = time.time()
            fields = await _one(stub, timeout, op="time")
            answered = time.time()
            if result.clock_uncertainty is None or (answered - sent) / 2 < result.clock_uncertainty:
                result.clock_offset = float(fields["time"]) - (sent + answered) / 2
                result.clock_uncertainty = (answered - sent) / 2
        if probe_bytes:
            result.up_mbit = await _upload(stub, probe_bytes, timeout)
            result.down_mbit = await _download(stub, probe_bytes, timeout)
    except (wire.ProtocolError, asyncio.TimeoutError, OSError, KeyError, TypeError, ValueError) as e:
        result.error = str(e) or type(e).__name__
    except Exception as e:  # a libp2p failure (P2PDaemonError, P2PHandlerError): the peer has no probe or left
        result.error = f"{type(e).__name__}: {str(e)[:120]}"
    return result


async def _one(stub, timeout: float, **fields) -> dict:
    async def first() -> dict:
        async for message in await stub.rpc_probe(wire.request(**fields)):
            return wire.metadata_of(message)
        raise wire.StreamEnded("no answer")
    answer = await asyncio.wait_for(first(), timeout)
    if "error" in answer:
        raise wire.ProtocolError(f"refused: {str(answer['error'])[:120]}")
    return answer


async def _upload(stub, size: int, timeout: float) -> float:
    async def chunks():
        for start in range(0, size, CHUNK_BYTES):
            yield runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=bytes(min(CHUNK_BYTES, size - start)))])
    started = time.monotonic()
    answer = wire.metadata_of(await asyncio.wait_for(stub.rpc_upload(chunks()), timeout))
    if "error" in answer:
        raise wire.ProtocolError(f"refused: {str(answer['error'])[:120]}")
    return _mbit(int(answer["received"]), time.monotonic() - started)


async def _download(stub, size: int, timeout: float) -> float:
    async def read() -> int:
        received = 0
        async for message in await stub.rpc_probe(wire.request(op="download", bytes=size)):
            received += sum(len(tensor.buffer) for tensor in message.tensors)
            fields = wire.metadata_of(message)
            if "error" in fields:
                raise wire.ProtocolError(f"refused: {str(fields['error'])[:120]}")
            if received > size:
                raise wire.ProtocolError("the peer sent more than asked")
        return received
    started = time.monotonic()
    received = await asyncio.wait_for(read(), timeout)
    return _mbit(received, time.monotonic() - started)


def _mbit(size: int, seconds: float) -> float:
    return size * 8 / 1e6 / max(seconds, 1e-6)
