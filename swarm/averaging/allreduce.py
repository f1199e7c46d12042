"""Fault-tolerant all-reduce of a list of tensors within a sealed group.

Member ``i`` reduces part ``i`` of every tensor bucket (reduce-scatter), then every member fetches
every reduced part (all-gather), then members exchange which parts they failed to receive
(commit). A part that any member lacks is set to zero by every member. Zero suits what swarm
averages, gradients and pseudo-gradients: that slice of the update is skipped for one round, and
survivors stay identical instead of each keeping its own values as plain hivemind does.

Everything is pulled: a member fetches what it needs from the member that has it (``Outbox``);
silence longer than ``chunk_timeout`` marks that member as gone, so a dead peer costs at most one
chunk timeout per phase. Parts with non-finite values are refused when sent and when received.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional, Sequence

import torch
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression, TensorRole
from hivemind.compression.serialization import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_logger

from swarm.averaging.group import Group, slice_bounds
from swarm.averaging.outbox import Entry, Outbox

logger = get_logger(__name__)

Fetch = Callable[[PeerID, tuple, int], Awaitable[tuple[dict, list[runtime_pb2.Tensor]]]]


@dataclass
class AllreduceResult:
    tensors: list[torch.Tensor]
    group_size: int
    contributors: int  # peers whose input reached the reducer of this peer's part
    missing_parts: list[int]  # parts zeroed by every member (their reducer failed for someone)
    refused_inputs: int = 0  # inputs refused because they held NaN/Inf or did not match
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    sent: list[torch.Tensor] = field(default_factory=list)  # this peer's contribution as others decode it


@dataclass
class _Buckets:
    """Tensors grouped by codec and flattened: bucket b is one vector, cut into ``group.size`` slices."""

    codecs: list[CompressionBase]
    vectors: list[torch.Tensor]
    layout: list[tuple[int, int, int]]  # per tensor: bucket, offset, numel

    @classmethod
    def build(cls, tensors: Sequence[torch.Tensor], choose_codec: Callable[[torch.Tensor], CompressionBase]):
        codecs: list[CompressionBase] = []
        members: list[list[torch.Tensor]] = []
        layout = []
        for tensor in tensors:
            codec = choose_codec(tensor)
            index = next((i for i, known in enumerate(codecs) if known is codec), None)
            if index is None:
                codecs.append(codec)
                members.append([])
                index = len(codecs) - 1
            offset = sum(t.numel() for t in members[index])
            members[index].append(tensor)
            layout.append((index, offset, tensor.numel()))
        vectors = [torch.cat([t.detach().reshape(-1).float().cpu() for t in group]) for group in members]
        return cls(codecs, vectors, layout)

    def unflatten(self, vectors: list[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [vectors[b][offset:offset + numel].view_as(t).to(t.dtype) for (b, offset, numel), t in zip(self.layout, like)]


def _compress(codec: CompressionBase, tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor, role=TensorRole.GRADIENT))


def _decode(payload: runtime_pb2.Tensor, numel: int) -> Optional[torch.Tensor]:
    """The decoded part, or None if it is malformed (wrong size) or holds NaN/Inf."""
    try:
        tensor = deserialize_torch_tensor(payload).reshape(-1).float()
    except Exception:  # any decoding failure means the same thing: a bad part
        return None
    if tensor.numel() != numel or not torch.isfinite(tensor).all():
        return None
    return tensor


async def run_allreduce(
    group: Group,
    tensors: Sequence[torch.Tensor],
    *,
    weight: float,
    phase: int,
    outbox: Outbox,
    fetch: Fetch,
    choose_codec: Callable[[torch.Tensor], CompressionBase] = lambda tensor: NoCompression(),
) -> AllreduceResult:
    """Average ``tensors`` with the group, weighting this peer by ``weight`` (e.g. its samples).

    :param phase: distinguishes several all-reduces within one group (PowerSGD uses two).
    :param fetch: coroutine(peer, outbox key, max_bytes) -> (header, payloads) from that peer's outbox.
    """
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    gid, me, n = group.group_id, group.my_index, group.size
    buckets = await loop.run_in_executor(None, _Buckets.build, tensors, choose_codec)
    bounds = [slice_bounds(vector.numel(), n) for vector in buckets.vectors]

    # 1. offer every slice to its reducer, compressed; refuse to send NaN/Inf (also after compression:
    #    fp16 turns values beyond 65504 into Inf)
    def compress_inputs():
        payloads = [[_compress(codec, vector[bb[j][0]:bb[j][1]]) for codec, vector, bb in
                     zip(buckets.codecs, buckets.vectors, bounds)] for j in range(n)]
        decoded = [[_decode(payloads[j][k], b - a) for j, (a, b) in enumerate(bounds[k])]
                   for k in range(len(buckets.vectors))]
        if any(part is None for parts in decoded for part in parts):
            return payloads, None
        return payloads, [torch.cat(parts) for parts in decoded]

    payloads, sent = await loop.run_in_executor(None, compress_inputs)
    finite = sent is not None
    if not finite:
        logger.warning(f"round {group.round}: this peer's update holds NaN/Inf; it abstains from averaging")
        weight, sent = 0.0, [vector.clone() for vector in buckets.vectors]
    for j in range(n):
        header = {"weight": weight} if finite else {"weight": 0.0, "abstain": True}
        outbox.put((gid, phase, "in", j), Entry(payloads[j] if finite else [], header))
    bytes_sent = sum(len(p.buffer) for j, row in enumerate(payloads) if j != me for p in row) if finite else 0

    # 2. reduce my part: my own slices plus every other member's
    my_numels = [b - a for a, b in (bucket_bounds[me] for bucket_bounds in bounds)]
    mine = [vector[a:b] for vector, (a, b) in zip(buckets.vectors, (bb[me] for bb in bounds))]
    totals = [part * weight if finite else torch.zeros_like(part) for part in mine]  # NaN * 0 is still NaN
    total_weight, contributors, refused, received = weight, int(finite), 0, 0

    async def gather_input(index: int, peer: PeerID):
        try:
            return await fetch(peer, (gid, phase, "in", me), 8 * sum(my_numels) + 4096)
        except Exception as e:  # a member that cannot deliver is left out of this part
            logger.info(f"round {group.round}: no input from member {index} ({type(e).__name__}: {e})")
            return None

    for reply in await asyncio.gather(*(gather_input(index, peer) for index, peer in group.others())):
        if reply is None:
            continue
        header, parts = reply
        received += sum(len(p.buffer) for p in parts)
        if header.get("abstain"):
            continue
        decoded = [_decode(p, numel) for p, numel in zip(parts, my_numels)] if len(parts) == len(my_numels) else [None]
        peer_weight = header.get("weight")
        if any(part is None for part in decoded) or not isinstance(peer_weight, (int, float)) or not peer_weight >= 0:
            refused += 1
            logger.warning(f"round {group.round}: refused an input (NaN/Inf, wrong size or bad weight)")
            continue
        totals = [acc + part * float(peer_weight) for acc, part in zip(totals, decoded)]
        total_weight += float(peer_weight)
        contributors += 1
    averaged = [acc / total_weight if total_weight > 0 else torch.zeros_like(acc) for acc in totals]
    reduced = [_compress(codec, part) for codec, part in zip(buckets.codecs, averaged)]
    outbox.put((gid, phase, "out", me), Entry(reduced, {"contributors": contributors}))

    # 3. fetch every reduced part; my own is used as the others will decode it
    results: dict[int, list[torch.Tensor]] = {}
    missing: set[int] = set()
    own = [_decode(p, numel) for p, numel in zip(reduced, my_numels)]
    if any(part is None for part in own):
        missing.add(me)
    else:
        results[me] = own

    async def gather_output(index: int, peer: PeerID):
        numels = [bucket_bounds[index][1] - bucket_bounds[index][0] for bucket_bounds in bounds]
        try:
            header, parts = await fetch(peer, (gid, phase, "out", index), 8 * sum(numels) + 4096)
        except Exception as e:
            logger.warning(f"round {group.round}: part {index} lost with its reducer ({type(e).__name__}: {e})")
            return index, None, 0
        decoded = [_decode(p, numel) for p, numel in zip(parts, numels)] if len(parts) == len(numels) else [None]
        return index, (None if any(part is None for part in decoded) else decoded), sum(len(p.buffer) for p in parts)

    for index, decoded, size in await asyncio.gather(*(gather_output(i, peer) for i, peer in group.others())):
        received += size
        if decoded is None:
            missing.add(index)
        else:
            results[index] = decoded

    # 4. commit: agree on which parts to drop
    outbox.put((gid, phase, "commit", 0), Entry([], {"missing": sorted(missing)}))

    async def gather_commit(peer: PeerID):
        try:
            header, _ = await fetch(peer, (gid, phase, "commit", 0), 4096)
            return [int(i) for i in header.get("missing", []) if 0 <= int(i) < n]
        except Exception:
            return []  # a member gone by now has no say in what survivors keep

    for reported in await asyncio.gather(*(gather_commit(peer) for _, peer in group.others())):
        missing.update(reported)
    if missing:
        logger.warning(f"round {group.round}: {len(missing)}/{n} parts dropped by every member (reducer failed)")

    vectors = []
    for k, vector in enumerate(buckets.vectors):
        pieces = []
        for index, (a, b) in enumerate(bounds[k]):
            pieces.append(torch.zeros(b - a) if index in missing else results[index][k])
        vectors.append(torch.cat(pieces) if pieces else vector.clone())
    return AllreduceResult(
        tensors=buckets.unflatten(vectors, tensors),
        group_size=n,
        contributors=contributors,
        missing_parts=sorted(missing),
        refused_inputs=refused,
        bytes_sent=bytes_sent + sum(len(p.buffer) for p in reduced) * (n - 1),
        bytes_received=received,
        seconds=time.perf_counter() - started,
        sent=buckets.unflatten(sent, tensors),
    )
