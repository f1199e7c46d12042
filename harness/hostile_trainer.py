"""A hostile DiLoCo trainer: the real `swarm join`, except that what it contributes to each round's
all-reduce is attacked (for benchmarks/hostile_training.py).

    python -m harness.hostile_trainer ATTACK [swarm join arguments...]

``ATTACK`` is one of ``harness.averaging_peer``'s (``scale1000``, ``signflip``, ``noise100``) or
``weight`` (its own update, declared with 1000 times its samples). The seam is the averager's
``average`` call: everything else (records, state, its own outer step) is the honest peer's.
"""

from __future__ import annotations

import sys

from harness.averaging_peer import ATTACKS, attacked
from swarm.averaging.averager import Averager

WEIGHT_FACTOR = 1000.0


def install(attack: str) -> None:
    honest = Averager.average

    def average(self, round_number, tensors, *, weight, expected):
        if attack == "weight":
            return honest(self, round_number, tensors, weight=weight * WEIGHT_FACTOR, expected=expected)
        hostile = [attacked(attack, tensor, round_number)[0] for tensor in tensors]
        return honest(self, round_number, hostile, weight=weight, expected=expected)

    Averager.average = average


def main() -> int:
    attack, args = sys.argv[1], sys.argv[2:]
    if attack not in ATTACKS:
        print(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}", file=sys.stderr)
        return 2
    install(attack)
    from peers.cli import main as swarm

    return swarm(args)


if __name__ == "__main__":
    sys.exit(main())
