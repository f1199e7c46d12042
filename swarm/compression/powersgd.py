"""PowerSGD (Vogels et al., 2019): rank-r averaging of matrices through two all-reduce rounds.

Each tensor of two or more dimensions is viewed as a matrix M (n x m: first dimension by the
rest) and, with error feedback, corrected by what the last round dropped from it. Then::

    P = M Q                 (n x r; Q is m x r, the same on every peer)
    P = allreduce(P);  P = orthonormal basis of P's columns
    Q = M^T P               (m x r)
    Q = allreduce(Q)
    average ~= P Q^T        (= P P^T mean(M): mean(M) projected on the shared basis P)
    residual = M - P (M^T P)^T     (this peer's own part that the projection dropped)

Q is kept and warm-starts the next round (one step of power iteration per round, as in the paper).
Tensors of fewer than two dimensions, and matrices too small to gain from it (see
``min_compression_rate``), are averaged uncompressed in the first all-reduce round, so every call
of :meth:`PowerSGD.average` makes exactly two all-reduce calls (one if nothing is compressed).

Bytes sent, relative to averaging uncompressed, are ``sum((n + m) r) + uncompressed values``
over ``sum(n m)`` (see :meth:`PowerSGD.plan`): for a 2048 x 2048 matrix, 1/256 at rank 4 and
1/32 at rank 32, in fp32. The all-reduce itself may compress P and Q further (e.g. fp16).

Consistency across peers: all peers must give the same tensor shapes in the same order and the
same ``seed``, and the all-reduce must return the same average (with the same weights in both
rounds) to every peer. The result is then identical on every peer. A peer with a different Q (a
late joiner) still gets the correct projection of the mean, only onto a worse basis, and has the
swarm's Q again after one round. The orthonormal basis is made canonical (positive diagonal of R)
so that peers whose linear algebra libraries differ do not flip a column's sign.

Error feedback and peers that differ for good (non-i.i.d. data, DiLoCo pseudo-gradients): the mean
of the residuals is exactly what the averages missed, and stays bounded. A single peer's residual,
though, keeps the part of its own difference from the mean that lies outside the shared basis, and
with a persistent difference it grows linearly with the rounds (measured: with i.i.d. noise it stays
flat). Watch :meth:`PowerSGD.residual_norm`; :meth:`PowerSGD.reset` clears it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from hivemind.utils import get_logger

from swarm.compression.residuals import accumulation_dtype, make_residual_memory

logger = get_logger(__name__)

AllReduce = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Returns the element-wise average across peers of the tensors it is given (same shapes out)."""


@dataclasses.dataclass(frozen=True)
class PowerSGDPlan:
    """Which tensors a call compresses, and how many values it sends per peer (both rounds)."""

    compressed: tuple[int, ...]  # indices of the tensors sent as rank-r factors
    ranks: tuple[int, ...]  # the rank used for each of them (at most the matrix's smaller side)
    sent_values: int  # values given to the two all-reduce calls
    total_values: int  # values the tensors hold: what averaging them uncompressed would send

    @property
    def ratio(self) -> float:
        """Values sent / values uncompressed (the bytes ratio too, as P and Q are fp32)."""
        return self.sent_values / max(self.total_values, 1)


def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (n x r) of the columns of ``matrix`` (n x r, n >= r), never NaN.

    Reduced QR, with each column's sign chosen so that R's diagonal is non-negative: the result
    is then a function of the input, not of the QR implementation. Zero or dependent columns get
    orthonormal completions instead of the NaN that plain Gram-Schmidt would divide into.
    """
    q, r = torch.linalg.qr(matrix, mode="reduced")
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The matrix a tensor is viewed as: first dimension by the product of the others."""
    return shape[0], shape[1:].numel()


class PowerSGD:
    """Average a list of tensors across peers with rank-``rank`` PowerSGD and error feedback.

    :param rank: columns of P and Q. Higher is more accurate and sends more: r (n + m) values per
      n x m matrix. Ranks 1-4 already train well with error feedback (the paper's results); raise
      it if the residual norm keeps growing.
    :param error_feedback: keep what the projection dropped and add it to the next round. Without it
      a low rank loses most of each gradient for good; leave it on unless measuring its effect.
    :param seed: seeds the initial Q of every matrix; it must be the same on every peer.
    :param min_compression_rate: a matrix is compressed only when n m >= this times r (n + m);
      smaller ones go uncompressed, where the two factors would save little or nothing.
    """

    def __init__(self, rank: int = 4, *, error_feedback: bool = True, seed: int = 0, min_compression_rate: float = 2.0):
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be at least 1, got {rank}")
        self.rank, self.seed, self.min_compression_rate = rank, seed, min_compression_rate
        self.residuals = make_residual_memory(error_feedback)
        self._qs: dict[int, torch.Tensor] = {}

    def plan(self, shapes: Sequence[torch.Size]) -> PowerSGDPlan:
        """What a call of :meth:`average` on tensors of these shapes compresses and sends."""
        compressed, ranks, sent = [], [], 0
        for index, shape in enumerate(shapes):
            shape = torch.Size(shape)
            rank = self._rank_for(shape)
            if rank:
                n, m = matrix_shape(shape)
                compressed.append(index)
                ranks.append(rank)
                sent += (n + m) * rank
            else:
                sent += shape.numel()
        total = sum(torch.Size(shape).numel() for shape in shapes)
        return PowerSGDPlan(tuple(compressed), tuple(ranks), sent, total)

    def average(self, tensors: Sequence[torch.Tensor], allreduce: AllReduce) -> list[torch.Tensor]:
        """The average of ``tensors`` across peers (this peer's copy), via two ``allreduce`` calls.

        Results have the shapes and dtypes of ``tensors``. If ``allreduce`` raises, the exception
        propagates and this object's state (residuals, Q) is left as it was before the call.
        """
        if not tensors:
            return []
        plan = self.plan([tensor.shape for tensor in tensors])
        compressed = set(plan.compressed)
        matrices = [self._corrected_matrix(index, tensors[index]) for index in plan.compressed]
        qs = [self._q(index, matrix, rank) for index, matrix, rank in zip(plan.compressed, matrices, plan.ranks)]
        plain = [tensor.detach() for index, tensor in enumerate(tensors) if index not in compressed]

        first = [matrix @ q for matrix, q in zip(matrices, qs)] + plain
        averaged_first = _checked(allreduce, first)
        bases = [orthonormalize(p.to(m.device, m.dtype)) for p, m in zip(averaged_first, matrices)]
        averaged_plain = averaged_first[len(matrices) :]
        if not matrices:
            return [mean.to(tensor.device, tensor.dtype) for mean, tensor in zip(averaged_plain, tensors)]

        local_qs = [(basis.T @ matrix).T for matrix, basis in zip(matrices, bases)]  # 3x faster than M^T P
        averaged_qs = [q.to(m.device, m.dtype) for q, m in zip(_checked(allreduce, local_qs), matrices)]

        for index, matrix, basis, local_q, mean_q in zip(plan.compressed, matrices, bases, local_qs, averaged_qs):
            self.residuals.update(index, matrix, basis @ local_q.T)
            if bool(mean_q.any()):  # an all-zero Q would make the next P zero: keep the old one then
                self._qs[index] = mean_q
        return self._assemble(tensors, plan.compressed, bases, averaged_qs, averaged_plain)

    def residual_norms(self) -> dict[int, float]:
        """L2 norm of each matrix's residual, keyed by tensor index (empty without error feedback)."""
        return self.residuals.norms()

    def residual_norm(self) -> float:
        """L2 norm of all residuals together: a norm that keeps growing asks for a higher rank."""
        return self.residuals.total_norm()

    def reset(self) -> None:
        """Forget residuals and warm-started Qs (the next call starts from the seeded Q again)."""
        self.residuals.reset()
        self._qs.clear()

    def _rank_for(self, shape: torch.Size) -> int:
        """The rank a tensor of this shape is compressed with, or 0 to send it uncompressed."""
        if len(shape) < 2:
            return 0
        n, m = matrix_shape(shape)
        rank = min(self.rank, n, m)
        return rank if n * m >= self.min_compression_rate * rank * (n + m) else 0

    def _corrected_matrix(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        matrix = tensor.detach().reshape(matrix_shape(tensor.shape)).to(accumulation_dtype(tensor.dtype))
        return self.residuals.corrected(index, matrix)

    def _q(self, index: int, matrix: torch.Tensor, rank: int) -> torch.Tensor:
        """The warm-started Q of this matrix, or a fresh one drawn from (seed, index) on the CPU."""
        m = matrix.shape[1]
        q = self._qs.get(index)
        if q is not None and q.shape == (m, rank):
            return q.to(matrix.device, matrix.dtype)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(m, rank, generator=generator, dtype=matrix.dtype).to(matrix.device)

    @staticmethod
    def _assemble(
        tensors: Sequence[torch.Tensor],
        compressed: Sequence[int],
        bases: list[torch.Tensor],
        averaged_qs: list[torch.Tensor],
        averaged_plain: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """The results in the order of ``tensors``: P Q^T for the compressed ones, the means for the rest."""
        approximations = {index: basis @ q.T for index, basis, q in zip(compressed, bases, averaged_qs)}
        plain = iter(averaged_plain)
        result = []
        for index, tensor in enumerate(tensors):
            value = approximations[index] if index in approximations else next(plain)
            result.append(value.reshape(tensor.shape).to(tensor.device, tensor.dtype))
        return result


def _checked(allreduce: AllReduce, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Call ``allreduce`` and check that it kept its contract: as many tensors, the same shapes."""
    averaged = list(allreduce(tensors))
    if len(averaged) != len(tensors) or any(a.shape != t.shape for a, t in zip(averaged, tensors)):
        got = [tuple(a.shape) for a in averaged]
        raise ValueError(f"allreduce returned shapes {got} for inputs {[tuple(t.shape) for t in tensors]}")
    return averaged
