"""PowerSGD (swarm.compression.powersgd). Its peers are threads that meet in a simulated all-reduce:
an exact average of the lists the peers hand it, the seam through which the real averager plugs in.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from codec_checks import relative_error
from swarm.compression.finite import check_finite
from swarm.compression.powersgd import PowerSGD, orthonormalize

# ----------------------------------------------------------------------------------------- PowerSGD


class SimulatedAllReduce:
    """N in-process peers (threads) meet here; each gets the exact element-wise mean of the lists."""

    def __init__(self, num_peers: int):
        self.barrier = threading.Barrier(num_peers, timeout=20)
        self.inputs: list = [None] * num_peers
        self.calls = [0] * num_peers

    def for_peer(self, peer: int):
        def allreduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            self.calls[peer] += 1
            self.inputs[peer] = tensors
            self.barrier.wait()
            averaged = [torch.stack([inputs[i] for inputs in self.inputs]).mean(0) for i in range(len(tensors))]
            self.barrier.wait()  # nobody overwrites self.inputs before everyone has read them
            return averaged

        return allreduce


def run_round(peers: list[PowerSGD], allreduce: SimulatedAllReduce, grads: list[list[torch.Tensor]]):
    with ThreadPoolExecutor(len(peers)) as pool:
        futures = [pool.submit(peer.average, g, allreduce.for_peer(i)) for i, (peer, g) in enumerate(zip(peers, grads))]
        return [future.result(timeout=30) for future in futures]


def exact_mean(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(column).mean(0) for column in zip(*grads)]


@pytest.mark.timeout(30)
def test_powersgd_recovers_a_low_rank_average_in_two_allreduce_calls():
    """3 peers, each gradient matrix of rank 2: the mean has rank <= 6, so rank 8 recovers it."""
    generator = torch.Generator().manual_seed(6)

    def low_rank(n: int, m: int) -> torch.Tensor:
        return torch.randn(n, 2, generator=generator) @ torch.randn(2, m, generator=generator)

    grads = [[low_rank(64, 48), torch.randn(48, generator=generator), low_rank(128, 64).reshape(128, 8, 8),
              torch.randn(4, 3, 5, 5, generator=generator)] for _ in range(3)]
    peers, allreduce = [PowerSGD(rank=8, seed=7) for _ in range(3)], SimulatedAllReduce(3)
    results = run_round(peers, allreduce, grads)

    assert allreduce.calls == [2, 2, 2]
    assert all(torch.equal(a, b) for result in results[1:] for a, b in zip(results[0], result)), "peers disagree"
    for got, want in zip(results[0], exact_mean(grads)):
        assert got.shape == want.shape and relative_error(got, want) < 1e-5
    plan = peers[0].plan([g.shape for g in grads[0]])
    assert plan.compressed == (0, 2) and plan.ranks == (8, 8)  # the 1-D bias and the small conv go as they are
    assert plan.sent_values == (64 + 48) * 8 + 48 + (128 + 64) * 8 + 300
    assert plan.ratio == pytest.approx(plan.sent_values / (64 * 48 + 48 + 128 * 64 + 300))


@pytest.mark.timeout(30)
def test_powersgd_needs_the_same_seed_on_every_peer():
    """Peers that differ by +-D around a rank-2 mean: with one seed the D parts cancel in the averaged P
    and rank 2 recovers the mean exactly; with a seed per peer they pollute the shared basis."""
    generator = torch.Generator().manual_seed(10)
    mean = torch.randn(64, 2, generator=generator) @ torch.randn(2, 48, generator=generator)
    deviation = 10 * torch.randn(64, 2, generator=generator) @ torch.randn(2, 48, generator=generator)
    grads = [[mean + deviation], [mean - deviation]]
    for seeds, check in (((0, 0), lambda error: error < 1e-4), ((0, 1), lambda error: error > 0.1)):
        results = run_round([PowerSGD(rank=2, seed=seed) for seed in seeds], SimulatedAllReduce(2), grads)
        assert check(relative_error(results[0][0], mean)), seeds


def powersgd_accumulated_errors(error_feedback: bool, steps: int = 100) -> tuple[dict[int, float], list[float]]:
    """3 peers, a full-rank gradient per peer (a common part plus fresh noise) averaged at rank 2:
    ||sum of exact means - sum of results|| and peer 0's residual norm, in units of one mean's norm."""
    generator = torch.Generator().manual_seed(8)
    common = torch.randn(64, 32, generator=generator)
    peers, allreduce = [PowerSGD(rank=2, error_feedback=error_feedback) for _ in range(3)], SimulatedAllReduce(3)
    drift, errors, residuals = torch.zeros(64, 32, dtype=torch.float64), {}, []
    for step in range(1, steps + 1):
        grads = [[common + torch.randn(64, 32, generator=generator), torch.randn(32, generator=generator)]
                 for _ in range(3)]
        results = run_round(peers, allreduce, grads)
        mean = exact_mean(grads)
        assert torch.allclose(results[0][1], mean[1]), "the 1-D tensor is averaged exactly"
        drift += mean[0].double() - results[0][0].double()
        errors[step] = float(drift.norm() / mean[0].norm())
        residuals.append(peers[0].residual_norm() / float(mean[0].norm()))
    assert allreduce.calls == [2 * steps] * 3
    return errors, residuals


@pytest.mark.timeout(60)
def test_powersgd_error_feedback_bounds_the_accumulated_error():
    # Measured: with error feedback the drift stays at about 9 means (rank 2 of a 64 x 32 full-rank
    # matrix drops most of it each step); without, it grows by about 0.9 means per step.
    with_feedback, residuals = powersgd_accumulated_errors(True)
    without, _ = powersgd_accumulated_errors(False)
    assert max(with_feedback.values()) < 15 and with_feedback[100] <= 1.25 * with_feedback[25]
    assert max(residuals[50:]) <= 1.25 * max(residuals[:25]), "a peer's residual stays bounded with i.i.d. noise"
    assert without[100] >= 3 * without[25] and without[100] >= 60


@pytest.mark.timeout(30)
def test_powersgd_peers_that_differ_for_good_keep_the_mean_bounded_but_grow_their_own_residual():
    """Documents a limit of PowerSGD's error feedback (see the powersgd module): with a persistent
    difference between peers, the averaged drift stays bounded while each peer's residual grows."""
    generator = torch.Generator().manual_seed(12)
    grads = [[torch.randn(64, 32, generator=generator)] for _ in range(2)]
    peers, allreduce = [PowerSGD(rank=2) for _ in range(2)], SimulatedAllReduce(2)
    mean, drift, drifts, residuals = exact_mean(grads)[0], torch.zeros(64, 32, dtype=torch.float64), [], []
    for _ in range(60):
        drift += mean.double() - run_round(peers, allreduce, grads)[0][0].double()
        drifts.append(float(drift.norm() / mean.norm()))
        residuals.append(peers[0].residual_norm() / float(mean.norm()))
    assert max(drifts[40:]) <= 1.25 * max(drifts[:20]) and max(drifts) < 15
    assert residuals[59] >= 2 * residuals[19]


@pytest.mark.timeout(30)
def test_powersgd_zero_and_rank_deficient_tensors_give_no_nan():
    peers, allreduce = [PowerSGD(rank=4) for _ in range(2)], SimulatedAllReduce(2)
    rank_one = torch.outer(torch.arange(1.0, 33.0), torch.ones(40))
    for _ in range(3):
        results = run_round(peers, allreduce, [[torch.zeros(32, 40), rank_one, torch.zeros(40)]] * 2)
        assert check_finite(results[0]) and torch.equal(results[0][0], torch.zeros(32, 40))
        assert relative_error(results[0][1], rank_one) < 1e-5
    assert peers[0].residual_norm() < 1e-3
    basis = orthonormalize(torch.zeros(10, 3))
    assert check_finite([basis]) and torch.allclose(basis.T @ basis, torch.eye(3))


@pytest.mark.timeout(10)
def test_orthonormal_basis_is_canonical():
    """R = basis^T P has a non-negative diagonal, so two QR implementations cannot flip a column's sign."""
    matrix = torch.randn(50, 4, generator=torch.Generator().manual_seed(11))
    basis = orthonormalize(matrix)
    r = basis.T @ matrix
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    assert torch.allclose(r, torch.triu(r), atol=1e-5) and bool((torch.diagonal(r) > 0).all())
    assert torch.allclose(basis @ r, matrix, atol=1e-5)


@pytest.mark.timeout(30)
def test_powersgd_warm_starts_q_and_leaves_its_state_alone_when_the_allreduce_fails():
    generator = torch.Generator().manual_seed(9)
    tensors = [torch.randn(64, 64, generator=generator)]
    peer = PowerSGD(rank=2)
    first = peer.average(tensors, lambda xs: xs)  # one peer: the all-reduce is the identity
    second = peer.average(tensors, lambda xs: xs)
    assert not torch.equal(first[0], second[0]), "Q must warm-start (and the residual be added)"
    norms = peer.residual_norms()

    calls = []

    def failing_allreduce(xs):
        calls.append(len(xs))
        if len(calls) == 2:
            raise TimeoutError("a peer vanished")
        return xs

    with pytest.raises(TimeoutError):
        peer.average(tensors, failing_allreduce)
    assert peer.residual_norms() == norms

    with pytest.raises(ValueError, match="allreduce returned"):
        peer.average(tensors, lambda xs: xs[:0])
    with pytest.raises(ValueError, match="rank"):
        PowerSGD(rank=0)


@pytest.mark.timeout(10)
def test_powersgd_without_matrices_makes_one_exact_allreduce_call():
    calls = []
    peer = PowerSGD(rank=4)
    result = peer.average([torch.ones(5), torch.full((2, 2), 3.0)], lambda xs: calls.append(xs) or xs)
    assert len(calls) == 1 and torch.equal(result[1], torch.full((2, 2), 3.0))
    assert peer.average([], lambda xs: calls.append(xs) or xs) == [] and len(calls) == 1


@pytest.mark.timeout(10)
def test_powersgd_bytes_relative_to_uncompressed():
    plan = PowerSGD(rank=4).plan([torch.Size([2048, 2048]), torch.Size([2048])])
    assert plan.sent_values == 4 * 4096 + 2048
    assert plan.ratio == pytest.approx((4 * 4096 + 2048) / (2048 * 2048 + 2048))
    assert PowerSGD(rank=32).plan([torch.Size([2048, 2048])]).ratio == pytest.approx(1 / 32)
