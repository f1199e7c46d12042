"""A group: the peers that average together in one round, in the order every member agrees on."""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.p2p import PeerID

# The largest weight (e.g. samples in a round) a member may declare: a float that is still an exact
# integer, far above any real round, and small enough that sums of a group never overflow. A finite
# bound, not a plausibility check: a member declaring more is refused, not clipped.
MAX_WEIGHT = float(2**53)


@dataclass(frozen=True)
class Group:
    round: int
    group_id: bytes
    members: tuple[PeerID, ...]  # sorted; member i reduces part i of every tensor
    my_index: int
    weights: tuple[float, ...] = ()  # what each member declared when joining (e.g. its samples this round)

    @property
    def total_weight(self) -> float:
        return float(sum(self.weights))

    @property
    def size(self) -> int:
        return len(self.members)

    def others(self) -> list[tuple[int, PeerID]]:
        return [(index, peer) for index, peer in enumerate(self.members) if index != self.my_index]


class RoundMissed(Exception):
    """This peer could not join the group of a round (it was sealed without it, or no leader answered)."""


def slice_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Split ``numel`` elements into ``parts`` contiguous, nearly equal slices."""
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
