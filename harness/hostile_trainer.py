"""A hostile DiLoCo trainer: the real `swarm join`, except that what it contributes to each round's
all-reduce is attacked (for benchmarks/hostile_training.py).

    python -m harness.hostile_trainer ATTACK [swarm join arguments...]

``ATTACK`` is one of
- ``harness.averaging_peer``'s contributions (``scale1000``, ``signflip``, ``noise100``) or ``weight``
  (its own update, declared with 1000 times its samples);
- ``stale``: every round it sends again the update of its first round (with its current weight);
- ``harness.hostile``'s members: ``missing`` (its commit reports every part missing: the veto),
  ``heartbeats`` (it answers fetches of its inputs and its part with heartbeats only), ``garbage`` (as a
  reducer, everyone gets noise for its part), ``equivocate`` (as a reducer, half the members get another
  result).
The seams are the averager's ``average`` call and its service (:func:`harness.hostile.make_hostile`):
everything else (records, state, its own outer step) is the honest peer's.
"""

from __future__ import annotations

import sys

from harness import averaging_peer
from harness.averaging_peer import attacked
from harness.hostile import make_hostile
from swarm.averaging.averager import Averager

WEIGHT_FACTOR = 1000.0
MEMBERS = ("missing", "heartbeats", "garbage", "equivocate")  # attacks on what the peer serves
ATTACKS = averaging_peer.ATTACKS + ("stale",) + MEMBERS


def install(attack: str) -> None:
    if attack in MEMBERS:
        start = Averager.__init__

        def init(self, *args, **kwargs):
            start(self, *args, **kwargs)
            make_hostile(self.service, veto=attack == "missing", stall=attack == "heartbeats",
                         garbage=attack == "garbage", equivocate=attack == "equivocate")

        Averager.__init__ = init
        return
    honest = Averager.average
    first: list = []

    def average(self, round_number, tensors, *, weight, expected):
        if attack == "weight":
            return honest(self, round_number, tensors, weight=weight * WEIGHT_FACTOR, expected=expected)
        if attack == "stale":
            first[:] = first or [tensor.clone() for tensor in tensors]
            return honest(self, round_number, [old.clone() for old in first], weight=weight, expected=expected)
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
