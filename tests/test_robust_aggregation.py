"""Robust aggregation at the reducer (swarm/averaging/robust.py)."""

from __future__ import annotations

import pytest
import torch

from swarm.averaging.robust import CenteredClip, WeightedMean, coordinate_median

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
