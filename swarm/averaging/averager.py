"""The averager component: one call averages a list of tensors with whoever is ready this round.

It composes the averaging service (matchmaking, all-reduce, RPCs), the compression plan (codecs,
error feedback, PowerSGD) and this peer's counters, so a caller (DiLoCo's outer step, the averaging
benchmark peer) says only what to average, with which weight and among whom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Optional

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_logger
from hivemind.utils.crypto import RSAPrivateKey

from swarm.averaging.accountability import Accountability
from swarm.averaging.counters import Counters
from swarm.averaging.exclusions import Exclusions
from swarm.averaging.group import MAX_WEIGHT, Group, RoundMissed
from swarm.averaging.robust import CenteredClip, WeightedMean
from swarm.averaging.service import AveragingService
from swarm.compression.finite import check_finite
from swarm.compression.plan import CompressionPlan
from swarm.compression.registry import wire_codecs
from swarm.net.bound_evidence import BoundEvidence
from swarm.net.exclusion_record import Evidence

logger = get_logger(__name__)


@dataclass
class Averaged:
    tensors: list[torch.Tensor]
    total_weight: float  # the weight of everyone whose contribution is in ``tensors``
    group_size: int  # 1: this peer averaged alone (no one else was ready, or the round failed)


class Averager:
    """:param averaging: the shared averaging section (:class:`swarm.config.schema.AveragingConfig`):
      codec, error feedback, chunk, request and round timeouts, robust aggregation (``robust``; null: off).
    :param max_weight: the most one member may weigh at this peer's reducer under robust aggregation:
      the run's plausible samples per peer and round (:class:`swarm.net.diloco_records.RecordBounds`).
    :param check_own_input: refuse to send this peer's own NaN/Inf (it abstains instead). False only
      in a fault-injection harness that plays a broken peer.
    :param accepted_codecs: payload formats accepted from others; by default those of
      ``averaging.compression`` (a benchmark that cycles codecs passes them all).
    :param owner, check_fetchers, admit, fetch_observer, drop_reported: see :class:`AveragingService`.
    :param private_key: this peer's identity key: with it, this peer signs the parts it reduces, checks
      the reducers' receipts and catches one that equivocates (:mod:`swarm.averaging.accountability`),
      and excludes it as ``averaging.robust.ban`` says (:attr:`exclusions`); None: none of that.
    :param direct_host: the interface for direct links (``network.listen_host``), used when
      ``averaging.direct`` is on and there is a ``private_key`` (:mod:`swarm.net.direct`); None: libp2p only.
    """

    def __init__(self, *, dht: hivemind.DHT, run_id: str, averaging, check_own_input: bool = True,
                 owner: Optional[bytes] = None, check_fetchers: bool = True,
                 accepted_codecs: Optional[Collection[str]] = None,
                 admit: Optional[Callable[[PeerID], Optional[str]]] = None,
                 fetch_observer: Optional[Callable[[dict], None]] = None, max_weight: float = MAX_WEIGHT,
                 drop_reported: bool = False, private_key: Optional[RSAPrivateKey] = None,
                 direct_host: Optional[str] = None):
        self.averaging = averaging
        self.counters = Counters()
        self.aggregator = make_aggregator(averaging.robust, max_weight=max_weight)
        self.plan = CompressionPlan(codec=averaging.compression, error_feedback=averaging.error_feedback,
                                    powersgd_rank=averaging.powersgd_rank,
                                    adaptive_threshold=averaging.adaptive_threshold,
                                    sparse_fraction=averaging.sparse_fraction, sparse_bits=averaging.sparse_bits)
        self.exclusions: Optional[Exclusions] = None
        if private_key is not None:
            ban = averaging.robust.ban if averaging.robust is not None else None
            self.exclusions = Exclusions(dht=dht, run_id=run_id, policy=ban, owner=owner).start()
            admit = _both(admit, self.exclusions.refusal)
        direct = (direct_host, averaging.direct_port) \
            if averaging.direct and direct_host is not None and private_key is not None else None
        self.service = AveragingService(dht=dht, run_id=run_id, chunk_timeout=averaging.chunk_timeout,
                                        request_timeout=averaging.request_timeout,
                                        accepted_codecs=accepted_codecs or wire_codecs(averaging.compression),
                                        check_own_input=check_own_input, owner=owner, check_fetchers=check_fetchers,
                                        admit=admit, fetch_observer=fetch_observer,
                                        drop_reported=drop_reported,
                                        accountability=Accountability(private_key) if private_key else None,
                                        direct=direct, private_key=private_key).start()
        self.last_group: Group | None = None  # for harnesses and benchmarks: the latest round's group
        self.last_result = None  # ... and its AllreduceResult (bytes, seconds, dropped parts)

    def average(self, round_number: int, tensors: list[torch.Tensor], *, weight: float,
                expected: Callable[[], set[PeerID]]) -> Averaged:
        """Form this round's group and average ``tensors`` in it, weighted by ``weight`` (e.g. samples).

        A round that finds no partner, or fails, returns this peer's own tensors (zeros if they hold
        NaN/Inf), counted as a failed round; the caller's state sync then repairs any difference.
        """
        if not check_finite(tensors):
            self.counters.nonfinite_updates += 1  # the all-reduce makes this peer abstain; logged there
        try:
            group = self.form_group(round_number, weight=weight, expected=expected)
            if group.size == 1:
                self.service.finish_group(group)
                return Averaged(self.alone(tensors, round_number), group.total_weight, 1)
            return Averaged(self.reduce(group, tensors, weight=weight), group.total_weight, group.size)
        except (RoundMissed, TimeoutError) as e:
            logger.warning(f"round {round_number}: averaging failed ({e}); applying this peer's own update, "
                           f"to be replaced by the swarm's state if it differs")
            self.counters.rounds_failed += 1
            return Averaged(self.alone(tensors, round_number), weight, 1)

    def form_group(self, round_number: int, *, weight: float, expected: Callable[[], set[PeerID]]) -> Group:
        """This round's group (raises :class:`RoundMissed` or ``TimeoutError``); pass it to :meth:`reduce`."""
        self.last_result = None
        group = self.service.form_group(round_number, weight=weight, expected=expected,
                                        timeout=self.averaging.averaging_timeout)
        self.last_group = group
        return group

    def reduce(self, group: Group, tensors: list[torch.Tensor], *, weight: float,
               plan: CompressionPlan | None = None) -> list[torch.Tensor]:
        """Average ``tensors`` within ``group`` through ``plan`` (default: this averager's), then release
        the group; raises if the all-reduce fails."""
        try:
            averaged = (plan or self.plan).average(
                tensors, lambda parts, phase, choose: self._allreduce(group, parts, weight, phase, choose))
        finally:
            self.service.finish_group(group)
        self.counters.rounds_ok += 1
        return averaged

    def alone(self, tensors: list[torch.Tensor], round_number: int) -> list[torch.Tensor]:
        """A group of one (or a peer cut off): its own tensors, minus anything non-finite."""
        if not check_finite(tensors):
            logger.warning(f"round {round_number}: this peer's update holds NaN/Inf; skipping it")
            return [torch.zeros_like(tensor) for tensor in tensors]
        self.plan.forget_residuals()
        return list(tensors)

    def _allreduce(self, group: Group, tensors, weight: float, phase: int, choose_codec):
        result = self.service.allreduce(group, tensors, weight=weight, phase=phase, choose_codec=choose_codec,
                                        timeout=self.averaging.averaging_timeout, aggregator=self.aggregator)
        counters = self.counters
        counters.refused_inputs += result.refused_inputs
        counters.clipped_inputs += len(result.clipped)
        counters.capped_weights += len(result.capped_weights)
        counters.peak_distance_ratio = max(counters.peak_distance_ratio, round(result.farthest, 3))
        counters.dropped_parts += len(result.missing_parts)
        if result.evidence:
            counters.equivocations += len({item.accused for item in result.evidence if isinstance(item, Evidence)})
            counters.oversized_results += len({item.accused for item in result.evidence
                                               if isinstance(item, BoundEvidence)})
            if self.exclusions is not None:
                self.exclusions.add(result.evidence)
        if result.clip_reports and self.exclusions is not None:
            self.exclusions.note_clips(result.clip_reports)
        counters.bytes_received += result.bytes_received
        counters.bytes_sent += result.bytes_sent
        self.last_result = result
        return result.tensors, result.sent

    def check(self) -> None:
        """:raises BackgroundError: the averaging service's event loop died."""
        self.service.check()
        if self.exclusions is not None:
            self.exclusions.check()

    def shutdown(self) -> None:
        if self.exclusions is not None:
            self.exclusions.shutdown()
        self.service.shutdown()


def _both(first: Optional[Callable[[PeerID], Optional[str]]],
          second: Callable[[PeerID], Optional[str]]) -> Callable[[PeerID], Optional[str]]:
    """An ``admit`` that refuses whom either refuses (with the first one's reason)."""
    if first is None:
        return second
    return lambda peer: first(peer) or second(peer)


def make_aggregator(robust, *, max_weight: float = MAX_WEIGHT) -> WeightedMean | CenteredClip:
    """The reducer's aggregator for the ``averaging.robust`` section (:class:`swarm.config.schema.RobustConfig`);
    None: the plain weighted mean."""
    if robust is None:
        return WeightedMean()
    return CenteredClip(radius=robust.radius, iterations=robust.iterations,
                        max_weight_ratio=robust.max_weight_ratio, max_weight=max_weight)
