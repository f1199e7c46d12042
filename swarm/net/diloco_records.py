"""The ``{run_id}_diloco_peers`` record: one per peer (subkey: its peer id), its progress and its state.

Value: ``[[round, samples, time], [state round, total samples, state hash, role]]``; either half may
be an empty list (a sync-mode peer settling the end of a run publishes only its state). What a read
returns is untrusted: :func:`parse_record` accepts only well-typed, non-negative values of bounded size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MAX_HASH_CHARS = 128
MAX_ROLE_CHARS = 32


@dataclass(frozen=True)
class Progress:
    round: int
    samples: int
    time: float


@dataclass(frozen=True)
class StateRecord:
    """A peer's outer state: ``total`` is the number of samples the state has seen (same on every peer
    that holds it), ``hash`` a digest of its tensors."""

    round: int
    total: int
    hash: str
    role: str = "volunteer"


def encode_record(progress: Optional[Progress], state: Optional[StateRecord]) -> list:
    """The value stored in the DHT for this peer's progress and state (None: that half is empty)."""
    return [[progress.round, progress.samples, progress.time] if progress is not None else [],
            [state.round, state.total, state.hash, state.role] if state is not None else []]


def parse_record(value) -> Optional[tuple[Optional[Progress], Optional[StateRecord]]]:
    """(progress, state) of a stored value, each None if that half is empty or malformed; None if the
    value is not a record at all."""
    if not _pair(value):
        return None
    return _progress_of(value[0]), _state_of(value[1])


def _pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2


def _progress_of(value) -> Optional[Progress]:
    if (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], int) and isinstance(value[1], int)
            and isinstance(value[2], (int, float)) and value[0] >= 0 and value[1] >= 0):
        return Progress(int(value[0]), int(value[1]), float(value[2]))
    return None


def _state_of(value) -> Optional[StateRecord]:
    if (isinstance(value, (list, tuple)) and len(value) == 4 and isinstance(value[0], int) and isinstance(value[1], int)
            and isinstance(value[2], str) and len(value[2]) <= MAX_HASH_CHARS and isinstance(value[3], str)):
        return StateRecord(int(value[0]), int(value[1]), value[2], value[3][:MAX_ROLE_CHARS])
    return None
