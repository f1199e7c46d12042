"""Robust aggregation at the reducer (swarm/averaging/robust.py), alone and inside the all-reduce.

The all-reduce tests run every member of a group in one process: the real ``run_allreduce`` of each
member on one event loop, fetching from the others' real outboxes (no network, no mock of the code
under test), so codecs, weights and the reducer's bookkeeping are exercised in the fast lane. The
same attacks between real processes are in ``test_robust_averaging.py``.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from hivemind.p2p import PeerID

from swarm.averaging.allreduce import run_allreduce
from swarm.averaging.averager import make_aggregator
from swarm.averaging.group import Group
from swarm.averaging.outbox import Outbox
from swarm.averaging.robust import CenteredClip, WeightedMean, coordinate_median
from swarm.compression.plan import CompressionPlan
from swarm.compression.registry import wire_codecs
from swarm.config.schema import AveragingConfig, RobustConfig

D = 20_000


def honest_inputs(n: int, d: int = D, seed: int = 0, shared: float = 3.0) -> list[torch.Tensor]:
    """Similar updates, as gradients of one model are: a shared direction plus each peer's own noise."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=generator)
    return [shared * common + torch.randn(d, generator=generator) for _ in range(n)]


def spread(vectors: list[torch.Tensor]) -> float:
    """Root mean square distance of the vectors from their mean: the honest inputs' own scale."""
    stacked = torch.stack(vectors)
    return float((stacked - stacked.mean(0)).norm(dim=1).pow(2).mean().sqrt())


def attack(name: str, own: torch.Tensor, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if name == "scale1000":
        return own * 1000
    if name == "signflip":
        return own * -4
    if name == "noise100":
        return torch.randn(own.shape, generator=generator) * (100 * own.norm() / own.numel() ** 0.5)
    raise ValueError(name)


@pytest.mark.parametrize("n,k", [(3, 1), (4, 1), (5, 2), (7, 3), (8, 3)])
@pytest.mark.parametrize("magnitude", [1e1, 1e6, 1e30])
def test_fewer_than_half_outliers_at_any_scale_move_the_result_by_at_most_the_radius(n, k, magnitude):
    honest = honest_inputs(n - k)
    generator = torch.Generator().manual_seed(7)
    outliers = [torch.randn(D, generator=generator) * magnitude for _ in range(k)]
    result = CenteredClip().aggregate(honest + outliers, [1.0] * n)
    error = float((result.vector - torch.stack(honest).mean(0)).norm())
    assert torch.isfinite(result.vector).all()
    # at the fixed point, k inputs held at distance tau pull by k / (n - k) x tau (honest ones unclipped)
    assert error <= 1.05 * k / (n - k) * result.radius, (error, result.radius)
    assert result.radius <= 2.0 * 1.5 * spread(honest), "an outlier must not widen the radius"
    assert set(result.clipped) == set(range(n - k, n)), result.clipped
    assert result.farthest > 2.0


@pytest.mark.parametrize("name", ["scale1000", "signflip", "noise100"])
def test_each_attack_is_absorbed_and_succeeds_against_the_plain_mean(name):
    honest = honest_inputs(3)
    inputs = honest + [attack(name, honest[0])]
    mean, scale = torch.stack(honest).mean(0), spread(honest)
    robust = CenteredClip().aggregate(inputs, [1.0] * 4)
    plain = WeightedMean().aggregate(inputs, [1.0] * 4)
    assert float((robust.vector - mean).norm()) < 0.9 * scale  # measured 0.78-0.82 at D = 262144
    assert float((plain.vector - mean).norm()) > 4 * scale  # measured 4.8 (signflip) to 968 (scale1000)
    assert list(robust.clipped) == [3] and robust.clipped[3] < 0.2


def test_an_inflated_weight_is_capped_at_twice_the_median():
    *honest, own = honest_inputs(4)  # the attacker's update is an ordinary one: only its weight attacks
    mean = torch.stack(honest).mean(0)
    robust = CenteredClip().aggregate(honest + [own], [1.0, 1.0, 1.0, 1000.0])
    plain = WeightedMean().aggregate(honest + [own], [1.0, 1.0, 1.0, 1000.0])

    def attacker_share(result) -> float:  # where the result lies on the line from the honest mean to the attacker
        direction = own - mean
        return float((result.vector - mean) @ direction / (direction @ direction))

    assert robust.capped == {3: 2.0} and robust.weight == 5.0
    assert attacker_share(robust) == pytest.approx(2 / 5, abs=0.02)
    assert attacker_share(plain) > 0.99


def test_weights_are_capped_at_the_plausible_bound_and_zero_weights_count_for_nothing():
    aggregator = CenteredClip(max_weight=100.0)
    assert aggregator.cap_weights([80.0, 90.0, 500.0, 0.0]) == ([80.0, 90.0, 100.0, 0.0], {2: 100.0})
    assert aggregator.cap_weights([10.0, 10.0, 10.0, 50.0]) == ([10.0, 10.0, 10.0, 20.0], {3: 20.0})
    assert aggregator.cap_weights([0.0, 0.0]) == ([0.0, 0.0], {})
    nothing = aggregator.aggregate([torch.ones(3), torch.ones(3)], [0.0, 0.0])
    assert nothing.weight == 0 and not nothing.vector.any()
    # a member with weight 0 (e.g. no samples this round) neither pulls the result nor sets the median
    honest = honest_inputs(3)
    with_idle = aggregator.aggregate(honest + [torch.full((D,), 1e9)], [1.0, 1.0, 1.0, 0.0])
    assert torch.allclose(with_idle.vector, torch.stack(honest).mean(0), atol=1e-4)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_without_outliers_the_result_is_the_weighted_mean(n):
    inputs = honest_inputs(n, seed=n)
    weights = [1.0 + 0.25 * i for i in range(n)]  # within the ratio: no weight is capped
    robust = CenteredClip().aggregate(inputs, weights)
    plain = WeightedMean().aggregate(inputs, weights)
    assert robust.clipped == {} and robust.capped == {} and robust.iterations == 2
    assert robust.farthest < 1.2, "i.i.d. inputs lie at about the same distance from their median"
    assert torch.allclose(robust.vector, plain.vector, rtol=0, atol=1e-5 * float(plain.vector.abs().max()))


def test_inputs_near_the_float32_limit_leave_the_result_finite():
    honest = honest_inputs(3)
    huge = torch.full((D,), 3.0e38)
    huge[::2] = -3.0e38
    result = CenteredClip().aggregate(honest + [huge, ], [1.0] * 4)
    assert torch.isfinite(result.vector).all() and 3 in result.clipped
    assert float((result.vector - torch.stack(honest).mean(0)).norm()) < spread(honest)
    # the median itself: two middle values near the limit are halved before they are added
    assert torch.isfinite(coordinate_median(torch.full((4, 3), 3.0e38))).all()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 12])
def test_coordinate_median_matches_torch(n):
    rows = torch.randn(n, 1000, generator=torch.Generator().manual_seed(n))
    ordered = rows.sort(dim=0).values
    assert torch.equal(coordinate_median(rows), ordered[(n - 1) // 2] / 2 + ordered[n // 2] / 2)


def test_identical_inputs_give_radius_zero_and_the_common_value():
    x = torch.randn(100)
    result = CenteredClip().aggregate([x, x.clone(), x.clone(), x + 5], [1.0] * 4)
    assert result.radius == 0 and torch.equal(result.vector, x) and list(result.clipped) == [3]


def test_config_section_builds_the_aggregator():
    assert isinstance(make_aggregator(None), WeightedMean)
    aggregator = make_aggregator(RobustConfig(radius=3.0, iterations=5, max_weight_ratio=4.0), max_weight=10.0)
    assert (aggregator.radius, aggregator.iterations, aggregator.max_weight_ratio, aggregator.max_weight) == \
        (3.0, 5, 4.0, 10.0)
    assert AveragingConfig().robust == RobustConfig(), "robust aggregation is on by default"
    assert AveragingConfig(robust=None).robust is None


# ---- inside the all-reduce: every member of a group in one process ------------------------------------


class LocalGroup:
    """``n`` members of one group, each running the real ``run_allreduce`` on one shared event loop and
    fetching parts from the others' real outboxes. :meth:`allreduce` is called from one thread per member
    (as each peer's trainer thread calls its averaging service)."""

    def __init__(self, n: int, *, codec: str = "none"):
        self.members = tuple(sorted(PeerID(bytes([index + 1]) * 20) for index in range(n)))
        self.outboxes = {peer: Outbox() for peer in self.members}
        self.accepted = wire_codecs(codec)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.round = 0

    @property
    def group_id(self) -> bytes:
        return self.round.to_bytes(16, "big")  # a new group every round, as matchmaking makes

    def group(self, index: int) -> Group:
        return Group(self.round, self.group_id, self.members, index, (1.0,) * len(self.members))

    async def _fetch(self, peer, key, max_bytes, allowance=0.0):
        entry = await self.outboxes[peer].get(key, timeout=10)
        if entry is None:
            raise TimeoutError(f"nothing under {key}")
        return entry.header, entry.payloads

    def allreduce(self, index: int, tensors, weight: float, phase: int, choose_codec, aggregator):
        me = self.members[index]
        self.outboxes[me].open_group(self.group_id, self.members)
        coroutine = run_allreduce(self.group(index), tensors, weight=weight, phase=phase, outbox=self.outboxes[me],
                                  fetch=self._fetch, choose_codec=choose_codec, accepted=self.accepted,
                                  aggregator=aggregator)
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def run(self, inputs: list[list[torch.Tensor]], weights: list[float], aggregators, plans=None):
        """One round: member i averages ``inputs[i]`` with weight ``weights[i]`` through ``plans[i]``
        (a CompressionPlan) and ``aggregators[i]``; returns each member's (averaged, AllreduceResult)."""
        outcomes: list = [None] * len(self.members)

        def member(index: int):
            results = []

            def allreduce(tensors, phase, choose_codec):
                result = self.allreduce(index, tensors, weights[index], phase, choose_codec, aggregators[index])
                results.append(result)
                return result.tensors, result.sent

            averaged = plans[index].average(inputs[index], allreduce)
            outcomes[index] = (averaged, results[-1])

        threads = [threading.Thread(target=member, args=(index,)) for index in range(len(self.members))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.round += 1
        return outcomes

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def local_group():
    groups = []

    def make(n: int, **options) -> LocalGroup:
        groups.append(LocalGroup(n, **options))
        return groups[-1]

    yield make
    for group in groups:
        group.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", ["none", "fp16", "uint8", "blockwise8", "adaptive"])
@pytest.mark.parametrize("robust", [True, False], ids=["robust", "plain"])
def test_allreduce_with_an_attacker_compressed_parts_and_error_feedback(local_group, codec, robust):
    """Four members, member 3 sends its update x1000 for three rounds, through a lossy codec with error
    feedback. Robust: every member holds the same result, close to the honest mean (on every part: the
    attacker runs the honest reducer here), every honest reducer names the attacker, and the honest
    residuals stay what the codec drops. Plain: the same attack decides the result. Two tensors of
    sizes that do not divide by 4 (parts of unequal length); ``adaptive`` sends them with two codecs
    (two buckets, which the reducer joins into one vector per member and splits again)."""
    n, attacker, d, cut = 4, 3, 70_001 + 5_003, 5_003
    group = local_group(n, codec=codec)
    aggregators = [make_aggregator(RobustConfig() if robust else None) for _ in range(n)]
    plans = [CompressionPlan(codec=codec, error_feedback=True) for _ in range(n)]
    for round_number in range(3):
        honest = honest_inputs(n - 1, d=d, seed=round_number)
        inputs = [[x[:cut], x[cut:]] for x in honest + [honest[0] * 1000]]
        outcomes = group.run(inputs, [1.0] * n, aggregators, plans)
        results = [torch.cat(averaged) for averaged, _ in outcomes]
        assert all(torch.equal(results[0], other) for other in results[1:]), "members disagree"
        assert torch.isfinite(results[0]).all()
        error = float((results[0] - torch.stack(honest).mean(0)).norm()) / spread(honest)
        if not robust:
            assert error > 100, error
            continue
        assert error < 0.9, error
        for index, (_, result) in enumerate(outcomes):
            assert list(result.clipped) == [attacker], (index, result.clipped)
            assert result.clipped[attacker] < 0.01 and result.contributors == n
        for plan in plans[:attacker]:  # what the codec dropped of each honest update, nothing of the clipping
            assert plan.residuals.total_norm() <= 0.05 * float(honest[0].norm()), plan.residuals.total_norm()


@pytest.mark.timeout(120)
def test_allreduce_caps_an_inflated_weight_at_every_reducer(local_group):
    group = local_group(4)
    aggregators = [make_aggregator(RobustConfig()) for _ in range(4)]
    plans = [CompressionPlan(codec="none") for _ in range(4)]
    inputs = [[x] for x in honest_inputs(4, d=1000)]
    outcomes = group.run(inputs, [1.0, 1.0, 1.0, 1e9], aggregators, plans)
    expected = (inputs[0][0] + inputs[1][0] + inputs[2][0] + 2 * inputs[3][0]) / 5
    for averaged, result in outcomes:
        assert result.capped_weights == {3: 2.0}
        assert torch.allclose(averaged[0], expected, atol=1e-5)


@pytest.mark.timeout(120)
def test_powersgd_factors_are_aggregated_robustly(local_group):
    """PowerSGD averages its factors P and Q through two all-reduces: both go through the reducer's
    CenteredClip, so a member whose matrix is x1000 moves the low-rank average by little."""
    n = 4
    group = local_group(n)
    aggregators = [make_aggregator(RobustConfig()) for _ in range(n)]
    plans = [CompressionPlan(codec="powersgd", powersgd_rank=4, error_feedback=True) for _ in range(n)]
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(64, 4, generator=generator) @ torch.randn(4, 48, generator=generator)
    honest = [low_rank + 0.1 * torch.randn(64, 48, generator=generator) for _ in range(n - 1)]
    outcomes = group.run([[x] for x in honest] + [[honest[0] * 1000]], [1.0] * n, aggregators, plans)
    results = [averaged[0] for averaged, _ in outcomes]
    assert all(torch.equal(results[0], other) for other in results[1:])
    mean = torch.stack(honest).mean(0)
    assert float((results[0] - mean).norm()) < 0.2 * float(mean.norm())

