"""Fault-tolerant all-reduce of a list of tensors within a sealed group.

Member ``i`` reduces part ``i`` of every tensor bucket (reduce-scatter), then every member fetches
every reduced part (all-gather), then members exchange which parts they failed to receive
(commit), and each member fetches a part it lacks from a member that holds it (repair). A part
that no member can deliver (its reducer died before serving anyone) is set to zero, alike on every
member that lacks it. Zero suits what swarm averages, gradients and pseudo-gradients: that
slice of the update is skipped for one round, and survivors stay identical instead of each keeping
its own values as plain hivemind does.

A member's report of what it lacks counts for that member alone: the others do not drop those parts,
and do not ask it for them. Before issue 11 every member dropped every part that any member reported
lacking, so one member reporting every part missing zeroed the whole update for all
(``drop_reported`` restores that rule, for a harness that shows the attack). The repair keeps honest
members identical where the old rule did, and loses less: a part lost between one reducer and one
member is fetched from another member instead of being dropped by everyone. Its cost: a member keeps
the reduced parts it received in its outbox, to relay, for the outbox's retention (one more
compressed copy of the update, besides its own inputs kept there already), and a member that lacks a
part spends one more fetch per holder it tries. A second fault during the repair (every holder of a
part failing that member) leaves it with a zero part that the others keep; DiLoCo's state sync
repairs that (:mod:`swarm.train.agreement`), as it already repairs a member that could not read
another member's commit.

Everything is pulled: a member fetches what it needs from the member that has it (``Outbox``);
silence longer than ``chunk_timeout`` marks that member as gone, so a dead peer costs at most one
chunk timeout per phase, and so do heartbeats without data for longer than ``chunk_timeout`` plus the
time this peer has spent in the all-reduce so far (a member may be that much slower; one that only
heartbeats is cut). Parts with non-finite values are refused when sent and when received.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Collection, Optional, Sequence

import torch
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression, TensorRole
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time, get_logger

from swarm.averaging.accountability import Accountability, find_equivocation, part_norm
from swarm.averaging.group import MAX_WEIGHT, Group, slice_bounds
from swarm.averaging.outbox import Entry, Outbox
from swarm.averaging.robust import Aggregate, CenteredClip, WeightedMean
from swarm.compression.payloads import PayloadError, decode_payload
from swarm.net.bound_evidence import BoundEvidence, find_oversized
from swarm.net.exclusion_record import Evidence
from swarm.net.norm_claims import INPUTS, NormClaim, claim_from_header, close_norms
from swarm.net.outlier_evidence import Clip

logger = get_logger(__name__)

# (peer, outbox key, max_bytes, allowance) -> (header, payloads); see AveragingService._fetch
Fetch = Callable[[PeerID, tuple, int, float], Awaitable[tuple[dict, list[runtime_pb2.Tensor]]]]


@dataclass
class AllreduceResult:
    tensors: list[torch.Tensor]
    group_size: int
    contributors: int  # peers whose input reached the reducer of this peer's part
    missing_parts: list[int]  # parts zeroed here: neither their reducer nor any member holding them delivered
    # members that failed to answer this peer (timed out, broke off, refused): the next round does not wait for them
    gone: list[int] = field(default_factory=list)
    refused_inputs: int = 0  # inputs refused because they held NaN/Inf or did not match
    # robust aggregation of this peer's part: member -> share of its input's deviation kept (clipped ones only)
    clipped: dict[int, float] = field(default_factory=dict)
    capped_weights: dict[int, float] = field(default_factory=dict)  # member -> weight it counted with, if capped
    farthest: float = 0.0  # the farthest input from the others, in robust scales (see robust.Aggregate)
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    sent: list[torch.Tensor] = field(default_factory=list)  # this peer's contribution as others decode it
    repaired_parts: list[int] = field(default_factory=list)  # lost with their reducer, fetched from another member
    # proof that a reducer returned different results to different members, or a result far beyond its
    # members' signed input norms (its part is dropped here)
    evidence: list[Evidence | BoundEvidence] = field(default_factory=list)
    # reducers' signed reports that they clipped a member's input, each checked, for Exclusions
    clip_reports: list[Clip] = field(default_factory=list)


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


def _reduced_codec(codec: CompressionBase, contributors: int) -> CompressionBase:
    """The codec of a reducer's result: the inputs' own, except for a sparse codec, whose result keeps the
    union of the inputs' values (:meth:`swarm.compression.sparse.SparseLowBit.for_reduced`): re-sparsifying it
    to one input's count would drop what no residual remembers (a reducer keeps none)."""
    for_reduced = getattr(codec, "for_reduced", None)
    return for_reduced(contributors) if for_reduced is not None else codec


def _decode(payload: runtime_pb2.Tensor, numel: int, accepted: Collection[str]) -> Optional[torch.Tensor]:
    """The decoded part, or None if it is malformed (a codec not accepted, a layout that does not match,
    a wrong size) or holds NaN/Inf. Nothing reaches a decoder before its lengths are checked."""
    try:
        tensor = decode_payload(payload, accepted=accepted, numel=numel).reshape(-1).float()
    except PayloadError as e:
        logger.debug(f"refused a payload: {e}")
        return None
    return tensor if torch.isfinite(tensor).all() else None


async def run_allreduce(
    group: Group,
    tensors: Sequence[torch.Tensor],
    *,
    weight: float,
    phase: int,
    outbox: Outbox,
    fetch: Fetch,
    choose_codec: Callable[[torch.Tensor], CompressionBase] = lambda tensor: NoCompression(),
    accepted: Collection[str] = ("NONE",),
    check_own_input: bool = True,
    aggregator: WeightedMean | CenteredClip = WeightedMean(),
    drop_reported: bool = False,
    accountability: Optional[Accountability] = None,
) -> AllreduceResult:
    """Average ``tensors`` with the group, weighting this peer by ``weight`` (e.g. its samples).

    :param phase: distinguishes several all-reduces within one group (PowerSGD uses two).
    :param fetch: coroutine(peer, outbox key, max_bytes, allowance) -> (header, payloads) from that peer's
      outbox; ``allowance`` is the seconds this peer has spent in the all-reduce so far, which the entry may
      take again to be ready (:meth:`swarm.averaging.service.AveragingService._fetch`).
    :param accepted: the payload formats accepted from others (:func:`swarm.compression.registry.wire_codecs`).
    :param check_own_input: abstain rather than send NaN/Inf; False only to play a broken peer in tests.
    :param aggregator: how this peer, as a reducer, combines the members' inputs for its part
      (:mod:`swarm.averaging.robust`: the plain weighted mean, or CenteredClip).
    :param drop_reported: drop every part that any member reports lacking, instead of repairing from a
      holder: the rule before issue 11, under which one member's report vetoes a part for all. True
      only in a harness that shows that attack.
    :param accountability: sign this peer's result and check the reducers' receipts, and compare them
      in the commit (:mod:`swarm.averaging.accountability`); None: results are taken unsigned, unchecked.
    """
    started = time.perf_counter()
    buckets = await asyncio.get_running_loop().run_in_executor(None, _Buckets.build, tensors, choose_codec)
    run = _Run(group, buckets, phase, outbox, fetch, frozenset(accepted), aggregator, started=started,
               drop_reported=drop_reported, accountability=accountability)
    sent = await run.offer_inputs(weight, check=check_own_input)
    await run.reduce_my_part()
    await run.gather_outputs()
    await run.commit()
    await run.repair()
    return AllreduceResult(
        tensors=buckets.unflatten(run.assemble(), tensors),
        group_size=group.size,
        contributors=run.contributors,
        missing_parts=sorted(run.missing),
        gone=sorted(run.gone),
        refused_inputs=run.refused,
        clipped=run.clipped,
        capped_weights=run.capped,
        farthest=run.farthest,
        bytes_sent=run.bytes_sent,
        bytes_received=run.bytes_received,
        seconds=time.perf_counter() - started,
        sent=buckets.unflatten(sent, tensors),
        repaired_parts=sorted(run.repaired),
        evidence=run.evidence,
        clip_reports=run.clip_reports,
    )


class _Run:
    """One all-reduce of one group, phase by phase. Part ``i`` of bucket ``k`` is
    ``vectors[k][bounds[k][i][0]:bounds[k][i][1]]``; member ``i`` reduces it."""

    def __init__(self, group: Group, buckets: _Buckets, phase: int, outbox: Outbox, fetch: Fetch,
                 accepted: frozenset[str], aggregator: WeightedMean | CenteredClip, *, started: float,
                 drop_reported: bool = False, accountability: Optional[Accountability] = None):
        self.group, self.buckets, self.phase, self.outbox, self._fetch = group, buckets, phase, outbox, fetch
        self.accepted, self.aggregator = accepted, aggregator
        self.started, self.drop_reported = started, drop_reported
        self.clipped: dict[int, float] = {}
        self.capped: dict[int, float] = {}
        self.farthest = 0.0
        self.bounds = [slice_bounds(vector.numel(), group.size) for vector in buckets.vectors]
        self.results: dict[int, list[torch.Tensor]] = {}
        self.missing: set[int] = set()
        self.gone: set[int] = set()  # members that failed to answer: not asked again this round
        self.lacking: dict[int, set[int]] = {}  # member -> the parts its commit says it lacks
        self.repaired: list[int] = []
        self.contributors = self.refused = self.bytes_sent = self.bytes_received = 0
        self.weight, self.finite = 0.0, True
        self.accountability = accountability
        self.began = get_dht_time()  # receipts of this all-reduce are signed after it (see Accountability.check)
        self.receipts: dict[int, list] = {}  # part -> its reducer's receipt for what this peer holds
        self.evidence: list[Evidence | BoundEvidence] = []
        self.clip_reports: list[Clip] = []  # each checked
        self.convicted: set[int] = set()  # parts whose reducer was proven to equivocate or to be out of bounds
        self.member_ids = [member.to_base58() for member in group.members]
        self.claims: dict[int, NormClaim] = {}  # member -> its checked input claim (with its input or commit)
        self.statements: dict[int, NormClaim] = {}  # part -> its reducer's checked statement of the result's norm
        # results are held to the members' input norms only under robust aggregation (swarm.net.bound_evidence)
        self.bounded = accountability is not None and isinstance(aggregator, CenteredClip)

    async def fetch(self, peer: PeerID, key: tuple, max_bytes: int) -> tuple[dict, list[runtime_pb2.Tensor]]:
        """``peer``'s entry ``key``. The entry may take as long again to be ready as this peer has spent in
        this all-reduce so far (a member that much slower still gets through): heartbeats alone for
        longer than that plus ``chunk_timeout`` fail the fetch."""
        return await self._fetch(peer, key, max_bytes, time.perf_counter() - self.started)

    def numels(self, index: int) -> list[int]:
        return [bucket[index][1] - bucket[index][0] for bucket in self.bounds]

    def key(self, kind: str, index: int) -> tuple:
        return (self.group.group_id, self.phase, kind, index)

    def decode_all(self, payloads: list[runtime_pb2.Tensor], index: int) -> Optional[list[torch.Tensor]]:
        """Part ``index`` decoded, or None if any piece is malformed or not finite."""
        numels = self.numels(index)
        if len(payloads) != len(numels):
            return None
        decoded = [_decode(payload, numel, self.accepted) for payload, numel in zip(payloads, numels)]
        return None if any(part is None for part in decoded) else decoded

    async def offer_inputs(self, weight: float, check: bool = True) -> list[torch.Tensor]:
        """Compress every part for its reducer. NaN/Inf is never sent, also when compression makes it
        (fp16 turns values beyond 65504 into Inf): this peer then abstains (unless ``check`` is off, as
        a broken peer's would be). Returns what was sent."""
        n, buckets = self.group.size, self.buckets

        def compress():
            payloads = [[_compress(codec, vector[bounds[j][0]:bounds[j][1]]) for codec, vector, bounds in
                         zip(buckets.codecs, buckets.vectors, self.bounds)] for j in range(n)]
            if not check:
                decoded = [[vector[bounds[j][0]:bounds[j][1]] for vector, bounds in zip(buckets.vectors, self.bounds)]
                           for j in range(n)]
                return payloads, [vector.clone() for vector in buckets.vectors], self.claim_norms(decoded)
            decoded = [self.decode_all(payloads[j], j) for j in range(n)]
            if any(parts is None for parts in decoded):
                return payloads, None, None
            sent = [torch.cat([decoded[j][k] for j in range(n)]) for k in range(len(buckets.vectors))]
            return payloads, sent, self.claim_norms(decoded)

        payloads, sent, claim = await asyncio.get_running_loop().run_in_executor(None, compress)
        self.finite = sent is not None
        if not self.finite:
            logger.warning(f"round {self.group.round}: this peer's update holds NaN/Inf; it abstains from averaging")
            sent = [vector.clone() for vector in buckets.vectors]
        self.weight = weight if self.finite else 0.0
        if claim is not None:
            self.claims[self.group.my_index] = claim
        for j in range(n):
            header = {"weight": self.weight} if self.finite else {"weight": 0.0, "abstain": True}
            if claim is not None:
                header["claim"] = claim.to_wire()
            self.outbox.put(self.key("in", j), Entry(payloads[j] if self.finite else [], header))
            if self.finite and j != self.group.my_index:
                self.bytes_sent += sum(len(payload.buffer) for payload in payloads[j])
        return sent

    def claim_norms(self, decoded: list[list[torch.Tensor]]) -> Optional[NormClaim]:
        """This peer's signed claim of its inputs' norms, one per part as its reducer decodes it (None
        without accountability, or if a norm is not finite)."""
        if self.accountability is None:
            return None
        norms = [part_norm(pieces) for pieces in decoded]
        if not all(math.isfinite(norm) for norm in norms):
            return None
        return self.accountability.sign_norms(self.group.round, self.group.group_id, self.phase, self.member_ids,
                                              INPUTS, norms)

    async def reduce_my_part(self) -> None:
        """Combine my part of my own input and of every input that arrives (``aggregator``), and offer the result."""
        me = self.group.my_index
        mine = [vector[a:b] for vector, (a, b) in zip(self.buckets.vectors, (bounds[me] for bounds in self.bounds))]
        inputs = [(me, mine, self.weight)] if self.finite else []  # NaN * 0 = NaN: a non-finite input stays out
        max_bytes = 8 * sum(self.numels(me)) + 4096

        async def fetch_input(index: int, peer: PeerID):
            try:
                return await self.fetch(peer, self.key("in", me), max_bytes)
            except Exception as e:  # any failure to deliver leaves that member out of this part
                logger.info(f"round {self.group.round}: no input from member {index} ({type(e).__name__}: {e})")
                self.gone.add(index)
                return None

        others = self.group.others()
        for (index, _), reply in zip(others, await asyncio.gather(*(fetch_input(i, peer) for i, peer in others))):
            if reply is None:
                continue
            header, payloads = reply
            self.bytes_received += sum(len(payload.buffer) for payload in payloads)
            if header.get("abstain"):
                continue
            decoded, peer_weight = self.decode_all(payloads, me), header.get("weight")
            if decoded is None or not isinstance(peer_weight, (int, float)) or not 0 <= peer_weight <= MAX_WEIGHT:
                self.refused += 1
                logger.warning(f"round {self.group.round}: refused an input (NaN/Inf, wrong size or bad weight)")
                continue
            if self.accountability is not None:
                claim = claim_from_header(header.get("claim"), self.member_ids[index], self.group.round,
                                          self.group.group_id, self.phase, self.member_ids, INPUTS)
                if claim is None or not close_norms(claim.norms[me], part_norm(decoded)):
                    self.refused += 1
                    logger.warning(f"round {self.group.round}: refused the input of member {index} (no signed "
                                   f"claim of its norms over this group, or one that does not match the input)")
                    continue
                self.claims[index] = claim
            inputs.append((index, decoded, float(peer_weight)))
        self.contributors = len(inputs)
        averaged = await asyncio.get_running_loop().run_in_executor(None, self.combine, inputs)
        reduced = [_compress(_reduced_codec(codec, self.contributors), part)
                   for codec, part in zip(self.buckets.codecs, averaged)]
        own = self.decode_all(reduced, me)  # used as the others will decode it
        header = {"contributors": self.contributors}
        if self.accountability is not None:  # a digest of the part and signatures: off the event loop
            header.update(await asyncio.get_running_loop().run_in_executor(None, self.sign_result, reduced, own))
            self.note_clips(header, me)
        self.outbox.put(self.key("out", me), Entry(reduced, header))
        self.bytes_sent += sum(len(payload.buffer) for payload in reduced) * (self.group.size - 1)
        if own is None:
            self.missing.add(me)
        else:
            self.results[me] = own

    def sign_result(self, reduced: list[runtime_pb2.Tensor], own: Optional[list[torch.Tensor]]) -> dict:
        """What this reducer signs about its result: the receipt, the statement of its norm, and a clip
        report for each member it clipped (with that member's claim)."""
        group, me, account = self.group, self.group.my_index, self.accountability
        signed = {"receipt": account.receipt(group.round, group.group_id, self.phase, me, reduced)}
        self.receipts[me] = signed["receipt"]
        if own is not None:
            self.statements[me] = account.sign_norms(group.round, group.group_id, self.phase, self.member_ids, me,
                                                     [part_norm(own)])
            signed["norm"] = self.statements[me].to_wire()
        accused = [(self.member_ids[index], self.claims[index]) for index in self.clipped
                   if index != me and index in self.claims]
        if accused:
            signed["clips"] = account.clip_reports(group.round, group.group_id, self.phase, me, accused)
        return signed

    def max_part_bytes(self, index: int) -> int:
        return 8 * sum(self.numels(index)) + 4096

    def combine(self, inputs: list[tuple[int, list[torch.Tensor], float]]) -> list[torch.Tensor]:
        """My part (one tensor per bucket) from the members' inputs (member, its pieces, its weight):
        each member's pieces are one vector to the aggregator, which sees the whole part at once."""
        numels = self.numels(self.group.my_index)
        if not inputs:
            return [torch.zeros(numel) for numel in numels]
        rows = torch.empty(len(inputs), sum(numels))  # one copy of each input, where the aggregator reads it
        for row, (_, pieces, _) in zip(rows, inputs):
            torch.cat(pieces, out=row)
        result = self.aggregator.aggregate(rows, [weight for _, _, weight in inputs])
        members = [index for index, _, _ in inputs]
        self.clipped = {members[i]: kept for i, kept in result.clipped.items()}
        self.capped = {members[i]: weight for i, weight in result.capped.items()}
        self.farthest = result.farthest
        self.report(result, members, [weight for _, _, weight in inputs])
        return list(result.vector.split(numels))

    def report(self, result: Aggregate, members: list[int], declared: list[float]) -> None:
        """Log what robust aggregation held back of whom: a WARNING for an input that kept less than half
        of its deviation from the others (or a weight cut to less than half), else INFO."""
        name = lambda index: self.group.members[index].to_base58()  # noqa: E731
        where = f"round {self.group.round}, part {self.group.my_index}"
        logger.debug(f"{where}: {len(members)} inputs, robust scale {result.scale:.3g}, farthest input "
                     f"{result.farthest:.3g} x scale, radius {result.radius:.3g}, {result.iterations} steps")
        for position, kept in result.clipped.items():
            log = logger.warning if kept < 0.5 else logger.info
            log(f"{where}: clipped the input of member {name(members[position])} to {kept:.3g} of its distance "
                f"from the centre (radius {result.radius:.3g}, robust scale {result.scale:.3g})")
        for position, weight in result.capped.items():
            log = logger.warning if weight < 0.5 * declared[position] else logger.info
            log(f"{where}: member {name(members[position])} declared weight {declared[position]:g}, "
                f"counted with {weight:g}")

    async def gather_outputs(self) -> None:
        """Fetch every other member's reduced part; a part that does not come is missing. A member that
        already failed to answer this round is not waited for again: its part is missing at once, so a
        dead peer costs one chunk timeout per round, not one per phase (the repair keeps this consistent).
        A part received is offered at once, under its reducer's key, to a member that will lack it: offered
        then, not when that member's commit is read, so a relay never waits on this peer's view of it."""
        async def fetch_output(index: int, peer: PeerID):
            if index in self.gone:
                return index, None, None
            try:
                header, payloads = await self.fetch(peer, self.key("out", index), self.max_part_bytes(index))
            except Exception as e:  # the reducer is gone or broken: its part is missing for this peer
                logger.warning(f"round {self.group.round}: part {index} lost with its reducer ({type(e).__name__}: {e})")
                self.gone.add(index)
                return index, None, None
            self.bytes_received += sum(len(payload.buffer) for payload in payloads)
            decoded = await self.checked_result(header, index, payloads, f"from its reducer {index}")
            if decoded is None:
                return index, None, None
            self.note_clips(header, index)
            return index, decoded, Entry(payloads, self.relayed_header(header))

        for index, decoded, entry in await asyncio.gather(*(fetch_output(i, peer) for i, peer in self.group.others())):
            if decoded is None:
                self.missing.add(index)
            else:
                self.results[index] = decoded
                self.outbox.put(self.key("out", index), entry)

    async def checked_result(self, header: dict, part: int, payloads: list[runtime_pb2.Tensor],
                             source: str) -> Optional[list[torch.Tensor]]:
        """Part ``part`` decoded, or None if it is malformed, or (with accountability) ``header`` lacks its
        reducer's valid receipt for ``payloads`` or its signed statement of the decoded part's norm (both
        are kept, for the commit)."""
        if not await self.receipt_holds(header, part, payloads, source):
            return None
        decoded = self.decode_all(payloads, part)
        if decoded is None or self.accountability is None:
            return decoded
        statement = claim_from_header(header.get("norm"), self.member_ids[part], self.group.round,
                                      self.group.group_id, self.phase, self.member_ids, part)
        if statement is None or not close_norms(statement.norms[0], part_norm(decoded)):
            self.refused += 1
            logger.warning(f"round {self.group.round}: refused part {part} {source} (no signed statement of its "
                           f"norm, or one that does not match it)")
            return None
        self.statements[part] = statement
        return decoded

    async def receipt_holds(self, header: dict, part: int, payloads: list[runtime_pb2.Tensor], source: str) -> bool:
        """True if accountability is off, or ``header`` carries part ``part``'s reducer's valid receipt for
        ``payloads`` (then it is kept, to compare in the commit); a part without one is refused."""
        if self.accountability is None:
            return True
        receipt = header.get("receipt")
        why = await asyncio.get_running_loop().run_in_executor(  # hashes the part: off the event loop
            None, lambda: self.accountability.check(receipt, self.group.members[part].to_base58(), self.group.round,
                                                    self.group.group_id, self.phase, part, payloads,
                                                    not_before=self.began))
        if why is not None:
            self.refused += 1
            logger.warning(f"round {self.group.round}: refused part {part} {source} ({why})")
            return False
        self.receipts[part] = receipt
        return True

    def note_clips(self, header: dict, part: int) -> None:
        """Keep the valid clip reports that came with part ``part`` (its receipt already checked)."""
        if self.accountability is not None and "clips" in header:
            self.clip_reports += self.accountability.check_clips(
                header["clips"], header["receipt"], [member.to_base58() for member in self.group.members],
                self.group.round, self.group.group_id, self.phase, part)

    def relayed_header(self, header: dict) -> dict:
        """What a relay of a part carries: its reducer's receipt and statement of its norm, nothing else."""
        return {"receipt": header["receipt"], "norm": header.get("norm")} if self.accountability is not None else {}

    async def commit(self) -> None:
        """Tell the others which parts this peer lacks and learn theirs: a member's report says whom not to
        ask for a part, and decides nothing else here (unless ``drop_reported``: then every member drops
        the union of the reports). With accountability, the commit also carries the receipts this peer
        holds, and a reducer whose receipts disagree is caught here (:meth:`compare_receipts`)."""
        n = self.group.size
        header = {"missing": sorted(self.missing)}
        if self.accountability is not None:
            header["receipts"] = [[part, receipt] for part, receipt in sorted(self.receipts.items())]
            if self.group.my_index in self.claims:
                header["claim"] = self.claims[self.group.my_index].to_wire()
        self.outbox.put(self.key("commit", 0), Entry([], header))
        received: dict[int, list] = {}
        claims: dict[int, object] = {}

        async def fetch_commit(index: int, peer: PeerID) -> None:
            try:
                header, _ = await self.fetch(peer, self.key("commit", 0), 4096)
                lacking = {int(part) for part in header.get("missing", []) if 0 <= int(part) < n}
                receipts = header.get("receipts", [])[:n] if isinstance(header.get("receipts"), list) else []
            except Exception:  # a member gone by now is not asked for parts
                self.gone.add(index)
                return
            received[index], claims[index] = receipts, header.get("claim")
            self.lacking[index] = lacking
            if lacking:
                logger.info(f"round {self.group.round}: member {index} reports lacking parts {sorted(lacking)}")

        members = [(index, peer) for index, peer in self.group.others() if index not in self.gone]
        await asyncio.gather(*(fetch_commit(index, peer) for index, peer in members))
        if self.accountability is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.compare_receipts, received)
            if self.bounded:
                await asyncio.get_running_loop().run_in_executor(None, self.check_bounds, claims)
        if self.drop_reported:  # the old rule: any member's report drops a part for everyone
            self.missing.update(*self.lacking.values())

    def compare_receipts(self, received: dict[int, list]) -> None:
        """Each part's receipts, this peer's and those the others' commits carry (each checked: a member
        cannot forge its reducer's signature): two over different results are proof that the reducer
        equivocated. Its part is dropped here (every member that reads the same commits drops it too),
        it counts as gone, and the proof is kept for :class:`swarm.averaging.exclusions.Exclusions`."""
        group = self.group
        by_part: dict[int, list] = {part: [receipt] for part, receipt in self.receipts.items()}
        for index, receipts in received.items():
            for item in receipts:
                try:
                    part, receipt = int(item[0]), item[1]
                except (TypeError, ValueError, IndexError, KeyError):
                    continue
                if 0 <= part < group.size and self.accountability.check(
                        receipt, group.members[part].to_base58(), group.round, group.group_id, self.phase, part,
                        not_before=self.began) is None:
                    by_part.setdefault(part, []).append(receipt)
        for part, receipts in sorted(by_part.items()):
            evidence = find_equivocation(receipts, group.round, group.group_id, self.phase, part)
            if evidence is None:
                continue
            logger.warning(f"round {group.round}: reducer {group.members[part]} returned different results for "
                           f"part {part} to different members (signed proof); its part is dropped")
            self.convict(part, evidence)

    def check_bounds(self, claims: dict[int, object]) -> None:
        """Each part's result against its members' signed input norms (those that came with their inputs
        to this peer's part, and those in the commits): a result far beyond all the others' claims is proof
        that its reducer returned garbage (:mod:`swarm.net.bound_evidence`). Its part is dropped here."""
        group = self.group
        for index, value in claims.items():
            if index not in self.claims:
                claim = claim_from_header(value, self.member_ids[index], group.round, group.group_id, self.phase,
                                          self.member_ids, INPUTS)
                if claim is not None:
                    self.claims[index] = claim
        by_signer = {self.member_ids[index]: claim for index, claim in self.claims.items()}
        for part, statement in sorted(self.statements.items()):
            if part == group.my_index or part in self.convicted:
                continue
            evidence = find_oversized(self.member_ids, statement, by_signer)
            if evidence is None:
                continue
            largest = max(claim.norms[part] for claim in evidence.claims)
            logger.warning(f"round {group.round}: reducer {group.members[part]} returned a result of norm "
                           f"{statement.norms[0]:.3g} for part {part}, over {statement.norms[0] / max(largest, 1e-30):.0f}"
                           f"x its members' signed input norms (signed proof); its part is dropped")
            self.convict(part, evidence)

    def convict(self, part: int, evidence: Evidence | BoundEvidence) -> None:
        """Drop ``part`` (proven bad), count its reducer as gone, and keep the proof for Exclusions."""
        self.evidence.append(evidence)
        self.convicted.add(part)
        self.missing.add(part)
        self.results.pop(part, None)
        if part != self.group.my_index:
            self.gone.add(part)

    async def repair(self) -> None:
        """Fetch each part this peer lacks from a member whose commit says it holds that part (not from
        its reducer, which already failed to deliver it, and not this peer's own part, which no one else
        can hold). A holder that fails to deliver counts as gone. What no holder delivers is dropped here."""
        me, n = self.group.my_index, self.group.size
        if not self.drop_reported:
            lacking = sorted(self.missing - {me} - self.convicted)
            repaired = await asyncio.gather(*(self._repair_part(part) for part in lacking))
            for part, decoded in repaired:
                if decoded is not None:
                    self.missing.discard(part)
                    self.results[part] = decoded
                    self.repaired.append(part)
        if self.missing:
            logger.warning(f"round {self.group.round}: {len(self.missing)}/{n} parts dropped by this member: "
                           f"{sorted(self.missing)}")

    async def _repair_part(self, part: int) -> tuple[int, Optional[list[torch.Tensor]]]:
        holders = [index for index, lacking in sorted(self.lacking.items()) if part not in lacking and index != part]
        for index in holders:
            if index in self.gone:
                continue
            try:
                peer = self.group.members[index]
                header, payloads = await self.fetch(peer, self.key("out", part), self.max_part_bytes(part))
            except Exception as e:  # it said it held the part and did not deliver it
                logger.info(f"round {self.group.round}: member {index} did not relay part {part} "
                            f"({type(e).__name__}: {e})")
                self.gone.add(index)
                continue
            self.bytes_received += sum(len(payload.buffer) for payload in payloads)
            decoded = await self.checked_result(header, part, payloads, f"relayed by member {index}")
            if decoded is not None:
                logger.info(f"round {self.group.round}: part {part}, not delivered here by its reducer, "
                            f"fetched from member {index}")
                return part, decoded
        return part, None

    def assemble(self) -> list[torch.Tensor]:
        vectors = []
        for k, bounds in enumerate(self.bounds):
            pieces = [torch.zeros(b - a) if index in self.missing else self.results[index][k]
                      for index, (a, b) in enumerate(bounds)]
            vectors.append(torch.cat(pieces))
        return vectors
