"""The averaging service: a background event loop that serves this peer's RPCs and runs its rounds.

The trainer's thread calls the blocking methods (``form_group``, ``allreduce``, ``download_state``);
they run as coroutines on the service's own loop, on a replica of the DHT's libp2p daemon. The RPCs
(``rpc_join``, ``rpc_fetch``, ``rpc_download_state``) live under a namespace made of the run id, so
peers of another run never reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import AsyncIterator, Awaitable, Callable, Collection, Optional, Sequence, TypeVar

import hivemind
import torch
from hivemind.compression import CompressionBase, NoCompression
from hivemind.compression.serialization import serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_logger
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging import wire
from swarm.averaging.accountability import Accountability
from swarm.averaging.allreduce import AllreduceResult, run_allreduce
from swarm.averaging.group import MAX_WEIGHT, Group
from swarm.averaging.matchmaking import Matchmaker
from swarm.averaging.outbox import Outbox
from swarm.averaging.progress import StateDownload
from swarm.averaging.robust import CenteredClip, WeightedMean
from swarm.compression.payloads import decode_payload
from swarm.errors import BackgroundError
from swarm.net.direct import DirectError, DirectPool, DirectServer

logger = get_logger(__name__)

StateProvider = Callable[[], Optional[tuple[dict, list[torch.Tensor]]]]
T = TypeVar("T")

# Fetch requests one peer may hold open here at once. A member of a group has at most a few in
# flight (its part's inputs, the averaged parts, the commit); the cap stops a peer from parking
# thousands of waiting streams.
MAX_OPEN_FETCHES_PER_PEER = 16
# State downloads served at once: one per asking peer, a few in all (each streams the whole state:
# without a cap, a few peers asking in a loop take a donor's whole upload).
MAX_STATE_DOWNLOADS, MAX_STATE_DOWNLOADS_PER_PEER = 4, 1
REFUSAL_LOG_PERIOD = 60.0  # seconds between log lines about refused callers (each one is counted)
# Tensor chunks on a direct link: larger than libp2p's 64 KiB (fewer messages to frame and parse), small
# enough that one takes well under chunk_timeout on a slow link (0.4 s at 10 Mbit/s).
DIRECT_CHUNK_BYTES = 512 << 10
MAX_ENDPOINTS = 4  # direct endpoints a peer may announce (its interfaces; each costs others a connect attempt)
DIRECT_CONNECT_TIMEOUT = 3.0  # seconds to connect and prove identities on one direct endpoint


class AveragingService(ServicerBase):
    """Start with :meth:`start` (raises if the loop cannot come up), :meth:`check` that it still runs,
    stop with :meth:`shutdown`.

    Not a :class:`~swarm.loops.PeriodicLoop`: its thread runs an asyncio event loop that serves RPCs and
    the trainer's coroutines as they come, with no period and no iteration to retry; a coroutine's
    error goes to whoever awaits it (the trainer's blocking call, a peer's RPC), not to the loop.

    :param chunk_timeout: silence (s) after which a peer counts as gone during a round. Keep it a few
      times the time one chunk (64 KB) takes on the slowest link, and well below ``round_timeout``.
      Heartbeats alone count as silence after ``chunk_timeout`` plus the time this peer has spent in
      the all-reduce so far (see :meth:`_fetch`), so a peer that heartbeats but never delivers is cut
      too; a state donor never needs to heartbeat, so it gets ``chunk_timeout`` alone.
    :param request_timeout: silence (s) after which a round's leader counts as gone.
    :param owner: this peer's ``[owner:<RSA key>]`` tag: its ready records for matchmaking are stored
      under it and signed (see :mod:`swarm.net.signed_record`); None: unsigned, for DHTs that check nothing.
    :param check_fetchers: serve a round's parts only to the members of its group, and a slice of this
      peer's update only to the member that reduces it. False only in a harness that shows the attack.
    :param admit: peer -> None if it may call this service, else the reason it may not
      (:meth:`swarm.net.admission.Admission.refusal`, asked about libp2p's authenticated caller id of every
      request); None: anyone may (a run without a manifest).
    :param drop_reported: drop every part that any member of a round reports lacking, as swarm did
      before issue 11 (one member's report vetoed a part for all); True only in a harness that shows
      that attack (:func:`swarm.averaging.allreduce.run_allreduce`).
    :param fetch_observer: called after each fetch of a round's part with ``{kind, index, peer, start,
      end, bytes}`` (``error`` instead of ``bytes`` if it failed), on the service's loop: keep it cheap.
      For traces in benchmarks and for fault tests that strike while parts are moving.
    :param accountability: sign this peer's reduced parts and check the receipts of others'
      (:mod:`swarm.averaging.accountability`); None: unsigned and unchecked (a harness shows the attack).
    :param direct: ``(host, port)`` to listen on for direct links (:mod:`swarm.net.direct`), which carry
      round parts and state downloads beside libp2p between peers that reach each other; needs
      ``private_key`` (they prove this peer's id with it). None: libp2p only, and no endpoint is announced.
    """

    def __init__(self, *, dht: hivemind.DHT, run_id: str, chunk_timeout: float, request_timeout: float,
                 accepted_codecs: Collection[str] = ("NONE",), check_own_input: bool = True,
                 owner: Optional[bytes] = None, check_fetchers: bool = True,
                 admit: Optional[Callable[[PeerID], Optional[str]]] = None,
                 fetch_observer: Optional[Callable[[dict], None]] = None, drop_reported: bool = False,
                 accountability: Optional[Accountability] = None, direct: Optional[tuple[str, int]] = None,
                 private_key: Optional[RSAPrivateKey] = None):
        if direct is not None and private_key is None:
            raise ValueError("direct links need the peer's private key")
        self.dht, self.run_id, self.owner, self.admit = dht, run_id, owner, admit
        self.direct, self.private_key = direct, private_key
        self.accountability = accountability
        self.drop_reported = drop_reported
        self.chunk_timeout, self.request_timeout = chunk_timeout, request_timeout
        self.accepted_codecs, self.check_own_input = frozenset(accepted_codecs), check_own_input
        self.check_fetchers, self.fetch_observer = check_fetchers, fetch_observer
        # requests of others refused, by reason (swarm.net.refusals.REQUEST_REASONS), for the metrics record
        self.refused: Counter[str] = Counter()
        self._refusal_log: dict[str, tuple[float, int]] = {}  # reason -> (last logged, refused since)
        self._open_fetches: Counter[PeerID] = Counter()
        self._state_downloads: Counter[PeerID] = Counter()
        self.namespace = f"{run_id}_swarm_averaging"
        self.peer_id: PeerID = dht.peer_id
        self.outbox = Outbox(retention=max(60.0, 4 * chunk_timeout))
        self.state_provider: StateProvider = lambda: None
        self.bytes_served = 0
        self.fetches: Counter[str] = Counter()  # round parts fetched here, by path: "direct", "libp2p"
        self.downloads: Counter[str] = Counter()  # state downloads started here, by the path that carried them
        self._direct_server: Optional[DirectServer] = None
        self._pool: Optional[DirectPool] = None
        self._endpoints: list[tuple[str, int]] = []  # where this peer's direct links listen
        self._discoveries: dict[PeerID, asyncio.Task] = {}  # asking a peer where its direct links listen
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="averaging-service", daemon=True)
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._p2p: Optional[P2P] = None
        self.matchmaker: Optional[Matchmaker] = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "AveragingService":
        self._thread.start()
        self._call(self._start(), timeout)
        return self

    def _run(self) -> None:
        try:
            self._loop.run_forever()
        except BaseException as e:  # raised in the owner's thread by check(), never swallowed
            self._error = e
            logger.error(f"the averaging service's event loop died: {e!r}", exc_info=e)

    def check(self) -> None:
        """:raises BackgroundError: the service's thread ended before :meth:`shutdown`."""
        if self._thread.ident is not None and not self._stopping and not self._thread.is_alive():
            cause = f": {self._error!r}" if self._error is not None else ""
            raise BackgroundError(f"the averaging service's event loop stopped{cause}") from self._error

    async def _start(self) -> None:
        self._p2p = await self.dht.replicate_p2p()
        self.matchmaker = Matchmaker(
            dht=self.dht, peer_id=self.peer_id, run_id=self.run_id, get_stub=self._stub,
            request_timeout=self.request_timeout, owner=self.owner, admit=self.admit,
        )
        if self.direct is not None:
            self._direct_server = DirectServer(private_key=self.private_key, namespace=self.namespace,
                                               serve=self._serve_direct, admit=self._direct_refusal)
            host, port = self.direct
            port = await self._direct_server.start(host, port)
            self._endpoints = await self._direct_endpoints(host, port)
            announced = ", ".join(f"{address}:{number}" for address, number in self._endpoints) or "none"
            logger.info(f"direct links for round parts listen on {host}:{port} (announced: {announced})")
            self._pool = DirectPool(private_key=self.private_key, namespace=self.namespace,
                                    connect_timeout=min(DIRECT_CONNECT_TIMEOUT, self.chunk_timeout))
        await self.add_p2p_handlers(self._p2p, namespace=self.namespace)

    async def _direct_endpoints(self, host: str, port: int) -> list[tuple[str, int]]:
        """Where others may reach the direct port: ``host`` itself, or for a wildcard every address that libp2p
        announces (relayed ones left out), loopback last."""
        if host not in ("0.0.0.0", "::", ""):
            return [(host, port)]
        hosts = []
        try:
            maddrs = await self._p2p.get_visible_maddrs(latest=True)
        except Exception as e:  # no addresses yet: others reach this peer over libp2p only
            logger.info(f"no addresses to announce for direct links ({e!r})")
            return []
        for maddr in maddrs:
            parts = str(maddr).split("/")
            if "p2p-circuit" in parts:
                continue
            for family in ("ip4", "ip6"):
                if family in parts and parts.index(family) + 1 < len(parts):
                    address = parts[parts.index(family) + 1]
                    if address not in hosts:
                        hosts.append(address)
        hosts.sort(key=lambda address: address.startswith("127.") or address == "::1")
        return [(address, port) for address in hosts[:MAX_ENDPOINTS]]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Remove the handlers, cancel what runs, stop the loop: each of the two waits (the handlers and
        tasks, the thread) takes at most ``timeout`` seconds; a stuck thread is left behind (a daemon)."""
        self._stopping = True
        if not self._thread.is_alive():
            return
        try:
            self._call(self._stop(), timeout)
        except Exception as e:  # leaving anyway; the daemon goes down with the DHT
            logger.warning(f"averaging service did not stop cleanly: {e!r}")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(f"the averaging service's thread did not stop within {timeout:g}s; leaving it behind")

    async def _stop(self) -> None:
        if self._p2p is not None:
            await self.remove_p2p_handlers(self._p2p, namespace=self.namespace)
        if self._direct_server is not None:
            await self._direct_server.close()
        if self._pool is not None:
            self._pool.close()
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
        return self._call(self._form_group(round_number, weight, expected, deadline), timeout + self.request_timeout + 5)

    async def _form_group(self, round_number: int, weight: float, expected, deadline: float) -> Group:
        group = await self.matchmaker.form_group(round_number, weight=weight, expected=expected, deadline=deadline)
        self.outbox.open_group(group.group_id, group.members)
        if self._pool is not None:  # learn where the members' direct links listen before the first fetch
            for _, peer in group.others():
                self._discover(peer)
        return group

    def allreduce(self, group: Group, tensors: Sequence[torch.Tensor], *, weight: float, phase: int = 0,
                  choose_codec: Callable[[torch.Tensor], CompressionBase] = lambda tensor: NoCompression(),
                  timeout: float, aggregator: WeightedMean | CenteredClip = WeightedMean()) -> AllreduceResult:
        coroutine = run_allreduce(group, tensors, weight=weight, phase=phase, outbox=self.outbox,
                                  fetch=self._observed_fetch if self.fetch_observer else self._fetch,
                                  choose_codec=choose_codec, accepted=self.accepted_codecs,
                                  check_own_input=self.check_own_input, aggregator=aggregator,
                                  drop_reported=self.drop_reported, accountability=self.accountability)
        result = self._call(asyncio.wait_for(coroutine, timeout), timeout + 5)
        self._loop.call_soon_threadsafe(self.matchmaker.remember, group, result.gone)  # before the next round
        return result

    def finish_group(self, group: Group) -> None:
        self._loop.call_soon_threadsafe(self.outbox.finish_group, group.group_id)
        self._loop.call_soon_threadsafe(self.matchmaker.forget, group.round)

    def download_state(self, peer: PeerID, *, timeout: float, max_bytes: int,
                       progress: Optional[StateDownload] = None) -> tuple[dict, list[torch.Tensor]]:
        """``peer``'s state; refused (:class:`wire.ProtocolError`, :class:`PayloadError`) if it carries more
        than ``max_bytes`` of tensor data or any tensor that is not plainly laid out (no codec).

        :param progress: counts the bytes received as they come (for progress lines)."""
        return self._call(self._download_state(peer, max_bytes, progress), timeout)

    # ---- RPC handlers (other peers call these) --------------------------------------------
    def _refuse(self, reason: str, what: str, asker: PeerID, answer: str) -> runtime_pb2.ExpertResponse:
        """Count a refused request by reason and answer it; logged at most once a minute per reason (one
        rogue peer can send thousands), with how many came since the last line."""
        self.refused[reason] += 1
        now = time.monotonic()
        last, held = self._refusal_log.get(reason, (-float("inf"), 0))
        if now - last < REFUSAL_LOG_PERIOD:
            self._refusal_log[reason] = (last, held + 1)
        else:
            self._refusal_log[reason] = (now, 0)
            since = f" ({held + 1} such refusals since the last line)" if held else ""
            logger.warning(f"refused {what} from {asker} ({reason}){since}")
        return wire.response(error=answer)

    def _refused_caller(self, caller: PeerID, what: str) -> Optional[runtime_pb2.ExpertResponse]:
        """The answer to a caller this run does not admit (counted and logged), or None to serve it."""
        reason = self.admit(caller) if self.admit is not None else None
        if reason is None:
            return None
        return self._refuse(reason, what, caller, f"refused: {reason}")

    def _direct_refusal(self, caller: str) -> Optional[str]:
        """Why a direct connection proven to come from ``caller`` is closed unanswered, or None (counted, logged)."""
        refused = self._refused_caller(PeerID.from_base58(caller), "a direct connection")
        return None if refused is None else "refused"

    async def rpc_join(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        refused = self._refused_caller(context.remote_id, "a join request")
        if refused is not None:
            yield refused
            return
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
        async for message in self._fetch_replies(request, context.remote_id):
            yield message

    async def _serve_direct(self, caller: str, body: bytes) -> AsyncIterator[bytes]:
        """A fetch or a state download that came over a direct link (:class:`DirectServer` bounds ``body`` and
        proved ``caller``): metadata ``op: state`` asks for the state, anything else is a fetch."""
        try:
            request = runtime_pb2.ExpertRequest.FromString(body)
            state = wire.metadata_of(request).get("op") == "state"
        except Exception:  # protobuf's DecodeError, or worse on garbage; wire.ProtocolError
            yield wire.response(error="malformed request").SerializeToString()
            return
        asker = PeerID.from_base58(caller)
        replies = self._state_replies(asker, DIRECT_CHUNK_BYTES) if state \
            else self._fetch_replies(request, asker, chunk_bytes=DIRECT_CHUNK_BYTES)
        async with contextlib.aclosing(replies):  # a closed connection releases this fetch's slot at once
            async for message in replies:
                yield message.SerializeToString()

    async def rpc_direct_endpoints(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Where this peer's direct links listen (none: it has none; fetch over libp2p)."""
        refused = self._refused_caller(context.remote_id, "a direct-endpoint request")
        if refused is not None:
            return refused
        return wire.response(endpoints=[list(endpoint) for endpoint in self._endpoints])

    async def _fetch_replies(self, request: runtime_pb2.ExpertRequest, asker: PeerID,
                             chunk_bytes: int = wire.CHUNK_BYTES) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            fields = wire.metadata_of(request)
            key = (bytes(fields["group"]), int(fields["phase"]), str(fields["kind"]), int(fields["index"]))
        except (wire.ProtocolError, KeyError, TypeError, ValueError):
            yield wire.response(error="malformed fetch request")
            return
        refused = self._refused_caller(asker, "a fetch")
        if refused is not None:
            yield refused
            return
        if self._open_fetches[asker] >= MAX_OPEN_FETCHES_PER_PEER:
            yield self._refuse("fetch-limit", "a fetch", asker, "too many open requests")
            return
        self._open_fetches[asker] += 1
        try:
            async for message in self._serve_fetch(key, asker, chunk_bytes):
                yield message
        finally:
            self._open_fetches[asker] -= 1
            if self._open_fetches[asker] <= 0:
                del self._open_fetches[asker]

    async def _serve_fetch(self, key: tuple, asker: PeerID,
                           chunk_bytes: int = wire.CHUNK_BYTES) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        heartbeat = self.chunk_timeout / 4
        if self.check_fetchers:
            members = await self.outbox.members(key[0], self.chunk_timeout)
            if members is None or not self.outbox.may_fetch(key, members, asker):
                member = members is not None and asker in members
                yield self._refuse("fetch-not-slice" if member else "fetch-not-member",
                                   f"a fetch of {key[2]} {key[3]} of a group", asker, "not yours to fetch")
                return
        waited, limit = 0.0, 60 * self.chunk_timeout  # a member asks only for what its group will produce
        entry = await self.outbox.get(key, heartbeat)
        while entry is None and waited < limit:
            yield wire.response(**wire.HEARTBEAT)
            waited += heartbeat
            entry = await self.outbox.get(key, heartbeat)
        if entry is None:
            yield wire.response(error="not available")
            return
        for message in wire.tensor_messages(entry.payloads, chunk_bytes=chunk_bytes, **entry.header):
            self.bytes_served += sum(len(t.buffer) for t in message.tensors)
            yield message

    async def rpc_download_state(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in self._state_replies(context.remote_id, wire.CHUNK_BYTES):
            yield message

    async def _state_replies(self, asker: PeerID, chunk_bytes: int) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        refused = self._refused_caller(asker, "a state download")
        if refused is not None:
            yield refused
            return
        if self._state_downloads[asker] >= MAX_STATE_DOWNLOADS_PER_PEER \
                or sum(self._state_downloads.values()) >= MAX_STATE_DOWNLOADS:
            yield self._refuse("state-limit", "a state download", asker, "busy serving state; try another donor")
            return
        state = self.state_provider()
        if state is None:
            yield wire.response(error="no state to share yet")
            return
        self._state_downloads[asker] += 1
        try:
            metadata, tensors = state
            loop = asyncio.get_running_loop()
            payloads = await loop.run_in_executor(None, lambda: [serialize_torch_tensor(t) for t in tensors])
            for message in wire.tensor_messages(payloads, chunk_bytes=chunk_bytes, **metadata):
                self.bytes_served += sum(len(t.buffer) for t in message.tensors)
                yield message
        finally:
            self._state_downloads[asker] -= 1
            if self._state_downloads[asker] <= 0:
                del self._state_downloads[asker]

    # ---- client side ------------------------------------------------------------------------
    def _stub(self, peer: PeerID):
        return self.get_stub(self._p2p, peer, namespace=self.namespace)

    async def _fetch(self, peer: PeerID, key: tuple, max_bytes: int,
                     allowance: float = 0.0) -> tuple[dict, list[runtime_pb2.Tensor]]:
        """One entry of ``peer``'s outbox. A stream broken off in transit is asked for once more: the
        entry is still there, and a live peer should not lose its part to one reset stream.

        :param allowance: seconds the entry may still legitimately take to be ready at ``peer`` (the
          all-reduce passes the time it has run so far: a member that much slower than this peer gets
          through). Heartbeats alone for longer than ``chunk_timeout + allowance`` raise
          :class:`wire.Stalled`: a peer that heartbeats but never delivers is cut there, not at the
          round's timeout.
        """
        group_id, phase, kind, index = key
        request = wire.request(group=group_id, phase=phase, kind=kind, index=index)
        if self._pool is not None:
            result = await self._over_direct(peer, request, lambda replies: wire.read_tensor_messages(
                aiter_with_timeout(replies, self.chunk_timeout), max_bytes=max_bytes,
                patience=self.chunk_timeout + allowance))
            if result is not None:
                self.fetches["direct"] += 1
                return result
        self.fetches["libp2p"] += 1
        for attempt in (1, 2):
            stream = await asyncio.wait_for(self._stub(peer).rpc_fetch(request), self.chunk_timeout)
            try:
                return await wire.read_tensor_messages(aiter_with_timeout(stream, self.chunk_timeout),
                                                       max_bytes=max_bytes, patience=self.chunk_timeout + allowance)
            except wire.StreamEnded as e:
                if attempt == 2:
                    raise
                logger.info(f"fetch of {kind} {index} from {peer} broke off ({e}); asking again")

    def _discover(self, peer: PeerID) -> asyncio.Task:
        """Ask ``peer`` (over libp2p, once) where its direct links listen, and open one; runs in the background."""
        task = self._discoveries.get(peer)
        if task is None or (task.done() and self._pool.due(peer.to_base58())):
            task = self._discoveries[peer] = asyncio.create_task(self._ask_endpoints(peer))
        return task

    async def _ask_endpoints(self, peer: PeerID) -> None:
        name = peer.to_base58()
        try:
            reply = await asyncio.wait_for(self._stub(peer).rpc_direct_endpoints(wire.request()), self.request_timeout)
            endpoints = _endpoints_of(wire.metadata_of(reply))
        except Exception as e:  # an old peer, a refusal, garbage: libp2p it is
            endpoints = []
            logger.debug(f"no direct endpoints from {peer}: {e!r}")
        self._pool.endpoints[name] = endpoints
        if not endpoints:
            self._pool.fail(name, "no direct endpoints", log=False)  # asked again after the pool's retry_after
        else:
            try:
                self._pool.release(await self._pool.channel(name))  # connected before the round needs it
            except DirectError:
                pass  # marked failed in the pool, logged there

    async def _over_direct(self, peer: PeerID, request: runtime_pb2.ExpertRequest,
                           read: Callable[[AsyncIterator[runtime_pb2.ExpertResponse]], Awaitable[T]]) -> Optional[T]:
        """``read(the replies to request)`` over a direct link, or None if there is none or it broke off (then
        libp2p serves it). A peer's answer (an error, too much data, silence) is raised as over libp2p."""
        name = peer.to_base58()
        try:  # learnt at group formation; at worst this fetch goes over libp2p while it goes on
            await asyncio.wait_for(asyncio.shield(self._discover(peer)), DIRECT_CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            return None
        if not self._pool.usable(name):
            return None
        try:
            channel = await self._pool.channel(name)
        except DirectError:
            return None
        try:
            return await read(wire.parse_responses(channel.exchange(request.SerializeToString())))
        except (DirectError, wire.StreamEnded) as e:
            self._pool.fail(name, str(e))
            return None
        finally:
            self._pool.release(channel)

    async def _observed_fetch(self, peer: PeerID, key: tuple, max_bytes: int, allowance: float = 0.0):
        entry = {"kind": key[2], "index": key[3], "peer": peer, "start": time.perf_counter()}
        try:
            header, payloads = await self._fetch(peer, key, max_bytes, allowance)
            entry["bytes"] = sum(len(p.buffer) for p in payloads)
            return header, payloads
        except Exception as e:
            entry["error"] = type(e).__name__
            raise
        finally:
            entry["end"] = time.perf_counter()
            self.fetch_observer(entry)

    async def _download_state(self, peer: PeerID, max_bytes: int,
                              progress: Optional[StateDownload]) -> tuple[dict, list[torch.Tensor]]:
        """Over a direct link where there is one (:attr:`downloads` counts by path), else over libp2p."""
        def read(stream):
            return wire.read_tensor_messages(aiter_with_timeout(stream, self.chunk_timeout), max_bytes=max_bytes,
                                             patience=self.chunk_timeout,
                                             on_bytes=progress.on_bytes if progress else None)

        received = await self._over_direct(peer, wire.request(op="state"), read) if self._pool is not None else None
        self.downloads["libp2p" if received is None else "direct"] += 1
        if received is None:
            stream = await asyncio.wait_for(self._stub(peer).rpc_download_state(wire.request()), self.chunk_timeout)
            received = await read(stream)
        header, payloads = received
        loop = asyncio.get_running_loop()
        tensors = await loop.run_in_executor(None, lambda: [decode_payload(p, accepted=("NONE",)) for p in payloads])
        return header, tensors


def _endpoints_of(fields: dict) -> list[tuple[str, int]]:
    """A peer's announced direct endpoints, checked: at most MAX_ENDPOINTS (host, port) pairs."""
    endpoints = fields.get("endpoints")
    if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
        raise wire.ProtocolError("malformed direct endpoints")
    checked = []
    for endpoint in endpoints:
        if not (isinstance(endpoint, (list, tuple)) and len(endpoint) == 2 and isinstance(endpoint[0], str)
                and len(endpoint[0]) <= 64 and isinstance(endpoint[1], int) and 0 < endpoint[1] < 65536):
            raise wire.ProtocolError("malformed direct endpoint")
        try:
            ipaddress.ip_address(endpoint[0])  # an address, never a name to resolve
        except ValueError:
            raise wire.ProtocolError("a direct endpoint that is not an IP address") from None
        checked.append((endpoint[0], endpoint[1]))
    return checked
