"""The averaging service: a background event loop that serves this peer's RPCs and runs its rounds.

The trainer's thread calls the blocking methods (``form_group``, ``allreduce``, ``download_state``);
they run as coroutines on the service's own loop, on a replica of the DHT's libp2p daemon. The RPCs
(``rpc_join``, ``rpc_fetch``, ``rpc_download_state``) live under a namespace made of the run id, so
peers of another run never reach them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import AsyncIterator, Callable, Collection, Optional, Sequence

import hivemind
import torch
from hivemind.compression import CompressionBase, NoCompression
from hivemind.compression.serialization import serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_logger
from hivemind.utils.asyncio import aiter_with_timeout

from swarm.averaging import wire
from swarm.averaging.allreduce import AllreduceResult, run_allreduce
from swarm.averaging.group import MAX_WEIGHT, Group
from swarm.averaging.matchmaking import Matchmaker
from swarm.averaging.outbox import Outbox
from swarm.compression.payloads import decode_payload

logger = get_logger(__name__)

StateProvider = Callable[[], Optional[tuple[dict, list[torch.Tensor]]]]


class AveragingService(ServicerBase):
    """Start with :meth:`start` (raises if the loop cannot come up), stop with :meth:`shutdown`.

    :param chunk_timeout: silence (s) after which a peer counts as gone during a round. Keep it a few
      times the time one chunk (64 KB) takes on the slowest link, and well below ``round_timeout``.
    :param request_timeout: silence (s) after which a round's leader counts as gone.
    """

    def __init__(self, *, dht: hivemind.DHT, run_id: str, chunk_timeout: float, request_timeout: float,
                 accepted_codecs: Collection[str] = ("NONE",), check_own_input: bool = True,
                 owner: Optional[bytes] = None):
        self.dht, self.run_id, self.owner = dht, run_id, owner
        self.chunk_timeout, self.request_timeout = chunk_timeout, request_timeout
        self.accepted_codecs, self.check_own_input = frozenset(accepted_codecs), check_own_input
        self.namespace = f"{run_id}_swarm_averaging"
        self.peer_id: PeerID = dht.peer_id
        self.outbox = Outbox(retention=max(60.0, 4 * chunk_timeout))
        self.state_provider: StateProvider = lambda: None
        self.bytes_served = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="averaging-service", daemon=True)
        self._p2p: Optional[P2P] = None
        self.matchmaker: Optional[Matchmaker] = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "AveragingService":
        self._thread.start()
        self._call(self._start(), timeout)
        return self

    async def _start(self) -> None:
        self._p2p = await self.dht.replicate_p2p()
        self.matchmaker = Matchmaker(
            dht=self.dht, peer_id=self.peer_id, run_id=self.run_id, get_stub=self._stub,
            request_timeout=self.request_timeout, owner=self.owner,
        )
        await self.add_p2p_handlers(self._p2p, namespace=self.namespace)

    def shutdown(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._stop(), timeout)
        except Exception as e:  # leaving anyway; the daemon goes down with the DHT
            logger.warning(f"averaging service did not stop cleanly: {e!r}")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    async def _stop(self) -> None:
        if self._p2p is not None:
            await self.remove_p2p_handlers(self._p2p, namespace=self.namespace)
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coroutine, timeout: Optional[float]):
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    # ---- blocking API for the trainer ---------------------------------------------------
    def form_group(self, round_number: int, *, weight: float, expected: Callable[[], set[PeerID]],
                   timeout: float) -> Group:
        """:raises RoundMissed: see :meth:`Matchmaker.form_group`."""
        deadline = time.monotonic() + timeout
        coroutine = self.matchmaker.form_group(round_number, weight=weight, expected=expected, deadline=deadline)
        return self._call(coroutine, timeout + self.request_timeout + 5)

    def allreduce(self, group: Group, tensors: Sequence[torch.Tensor], *, weight: float, phase: int = 0,
                  choose_codec: Callable[[torch.Tensor], CompressionBase] = lambda tensor: NoCompression(),
                  timeout: float) -> AllreduceResult:
        coroutine = run_allreduce(group, tensors, weight=weight, phase=phase, outbox=self.outbox,
                                  fetch=self._fetch, choose_codec=choose_codec, accepted=self.accepted_codecs,
                                  check_own_input=self.check_own_input)
        return self._call(asyncio.wait_for(coroutine, timeout), timeout + 5)

    def finish_group(self, group: Group) -> None:
        self._loop.call_soon_threadsafe(self.outbox.finish_group, group.group_id)
        self._loop.call_soon_threadsafe(self.matchmaker.forget, group.round)

    def download_state(self, peer: PeerID, *, timeout: float, max_bytes: int) -> tuple[dict, list[torch.Tensor]]:
        """``peer``'s state; refused (:class:`wire.ProtocolError`, :class:`PayloadError`) if it carries more
        than ``max_bytes`` of tensor data or any tensor that is not plainly laid out (no codec)."""
        return self._call(self._download_state(peer, max_bytes), timeout)

    # ---- RPC handlers (other peers call these) --------------------------------------------
    async def rpc_join(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            fields = wire.metadata_of(request)
            round_number, weight = int(fields["round"]), float(fields["weight"])
            if not (round_number >= 0 and 0 <= weight <= MAX_WEIGHT):
                raise ValueError("out of range")
        except (wire.ProtocolError, KeyError, TypeError, ValueError):
            yield wire.response(error="malformed join request")
            return
        async for reply in self.matchmaker.handle_join(round_number, context.remote_id, weight):
            yield wire.response(**reply)

    async def rpc_fetch(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            fields = wire.metadata_of(request)
            key = (bytes(fields["group"]), int(fields["phase"]), str(fields["kind"]), int(fields["index"]))
        except (wire.ProtocolError, KeyError, TypeError, ValueError):
            yield wire.response(error="malformed fetch request")
            return
        waited, limit = 0.0, 60 * self.chunk_timeout  # a member asks only for what its group will produce
        heartbeat = self.chunk_timeout / 4
        entry = await self.outbox.get(key, heartbeat)
        while entry is None and waited < limit:
            yield wire.response(**wire.HEARTBEAT)
            waited += heartbeat
            entry = await self.outbox.get(key, heartbeat)
        if entry is None:
            yield wire.response(error="not available")
            return
        for message in wire.tensor_messages(entry.payloads, **entry.header):
            self.bytes_served += sum(len(t.buffer) for t in message.tensors)
            yield message

    async def rpc_download_state(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        state = self.state_provider()
        if state is None:
            yield wire.response(error="no state to share yet")
            return
        metadata, tensors = state
        loop = asyncio.get_running_loop()
        payloads = await loop.run_in_executor(None, lambda: [serialize_torch_tensor(t) for t in tensors])
        for message in wire.tensor_messages(payloads, **metadata):
            self.bytes_served += sum(len(t.buffer) for t in message.tensors)
            yield message

    # ---- client side ------------------------------------------------------------------------
    def _stub(self, peer: PeerID):
        return self.get_stub(self._p2p, peer, namespace=self.namespace)

    async def _fetch(self, peer: PeerID, key: tuple, max_bytes: int) -> tuple[dict, list[runtime_pb2.Tensor]]:
        """One entry of ``peer``'s outbox. A stream broken off in transit is asked for once more: the
        entry is still there, and a live peer should not lose its part to one reset stream."""
        group_id, phase, kind, index = key
        request = wire.request(group=group_id, phase=phase, kind=kind, index=index)
        for attempt in (1, 2):
            stream = await asyncio.wait_for(self._stub(peer).rpc_fetch(request), self.chunk_timeout)
            try:
                return await wire.read_tensor_messages(aiter_with_timeout(stream, self.chunk_timeout), max_bytes=max_bytes)
            except wire.StreamEnded as e:
                if attempt == 2:
                    raise
                logger.info(f"fetch of {kind} {index} from {peer} broke off ({e}); asking again")

    async def _download_state(self, peer: PeerID, max_bytes: int) -> tuple[dict, list[torch.Tensor]]:
        stream = await asyncio.wait_for(self._stub(peer).rpc_download_state(wire.request()), self.chunk_timeout)
        header, payloads = await wire.read_tensor_messages(aiter_with_timeout(stream, self.chunk_timeout),
                                                           max_bytes=max_bytes)
        loop = asyncio.get_running_loop()
        tensors = await loop.run_in_executor(None, lambda: [decode_payload(p, accepted=("NONE",)) for p in payloads])
        return header, tensors

