"""The DiLoCo records: each peer's progress and state under ``{run_id}_diloco_peers``, and its
readiness to average a round under ``{run_id}_diloco_ready``. Schema, bounds and the DHT-side guard.

``{run_id}_diloco_peers``, one subkey per peer: ``[[round, samples, time], [state round, total samples,
state hash, role]]``; either half may be an empty list (a sync-mode peer settling the end of a run
publishes only its state). ``{run_id}_diloco_ready``, one subkey per peer: the round it is ready to
average (one key for every round, so that every DHT node can recognize and check it).

Both are signed (the subkey is ``[owner:<the peer's RSA key>]``, whose peer id is the writer's, see
:mod:`swarm.net.signed_record`) and bounded by :class:`RecordBounds`. :class:`DiLoCoRecordGuard` refuses
anything else on every DHT node; :func:`parse_record` applies the same schema and bounds again where a
record is read (what a read returns is untrusted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm.net import keys
from swarm.net.signed_record import CLOCK_SLACK, SignedRecordGuard, Verdict

MAX_HASH_CHARS = 128
MAX_ROLE_CHARS = 32
ROLES = ("volunteer", "institution")
# A genuine value is about 470 bytes with its signature (measured, RSA-2048), its subkey 390; anything over is an attack.
MAX_RECORD_BYTES = 1024
# At most this many peers' samples add up to one round's total (a state's total is the sum over its rounds).
MAX_PEERS = 4096


@dataclass(frozen=True)
class RecordBounds:
    """What a DiLoCo record may claim. Build it with :meth:`for_run` from the run's settings.

    :param max_round: the last round of the run (``training.max_epochs``), else 2^32.
    :param max_round_samples: one peer's samples in one round: a round closes after ``round_timeout``
      seconds at the latest and no peer trains faster than ``max_samples_per_second`` (the monitor's
      plausibility bound), so ``2 x round_timeout x max_samples_per_second`` (twice: the last step of
      a round, and clocks).
    """

    max_round: int = 2**32
    max_round_samples: int = 2**40

    @classmethod
    def for_run(cls, *, max_epochs: Optional[int], round_timeout: float, max_samples_per_second: float) -> "RecordBounds":
        return cls(max_round=max_epochs + 1 if max_epochs is not None else 2**32,
                   max_round_samples=math.ceil(2 * round_timeout * max_samples_per_second))

    def max_total(self, round_number: int) -> int:
        """A state's total samples after ``round_number`` rounds: at most :data:`MAX_PEERS` peers, each
        at most ``max_round_samples``, in each round (plus one round: a sync-mode epoch counts as both)."""
        return (round_number + 1) * MAX_PEERS * self.max_round_samples


DEFAULT_BOUNDS = RecordBounds()


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


def parse_record(value, bounds: RecordBounds = DEFAULT_BOUNDS) -> Optional[tuple[Optional[Progress], Optional[StateRecord]]]:
    """(progress, state) of a stored value, each None if that half is empty; None if the value is not a
    well-formed record within ``bounds``."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        return None
    progress, state = _progress_of(value[0], bounds), _state_of(value[1], bounds)
    if (progress is None and value[0] != []) or (state is None and value[1] != []):
        return None
    return progress, state


def _count(value, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


def _progress_of(value, bounds: RecordBounds) -> Optional[Progress]:
    if (isinstance(value, (list, tuple)) and len(value) == 3 and _count(value[0], bounds.max_round)
            and _count(value[1], bounds.max_round_samples) and type(value[2]) in (int, float)
            and 0.0 <= value[2] <= get_dht_time() + CLOCK_SLACK):
        return Progress(value[0], value[1], float(value[2]))
    return None


def _state_of(value, bounds: RecordBounds) -> Optional[StateRecord]:
    if (isinstance(value, (list, tuple)) and len(value) == 4 and _count(value[0], bounds.max_round)
            and _count(value[1], bounds.max_total(value[0])) and isinstance(value[2], str)
            and 0 < len(value[2]) <= MAX_HASH_CHARS and value[3] in ROLES):
        return StateRecord(value[0], value[1], value[2], value[3])
    return None


class DiLoCoRecordGuard(SignedRecordGuard):
    """Refuses, on this DHT node, DiLoCo records that are not signed by their owner, oversized, expire
    further ahead than their kind's TTL, or fail the schema (``schema``) or the bounds (``implausible``)."""

    def __init__(self, run_id: str, signatures: RSASignatureValidator, bounds: RecordBounds = DEFAULT_BOUNDS):
        self.peers_key, self.ready_key = keys.diloco_peers(run_id), keys.diloco_ready(run_id)
        super().__init__(keys={self.peers_key: keys.DILOCO_TTL, self.ready_key: keys.READY_TTL},
                         signatures=signatures, max_bytes=MAX_RECORD_BYTES)
        self.bounds = bounds

    def check_value(self, key: str, owner: str, value, record: DHTRecord) -> Verdict:
        if key == self.ready_key:
            if _count(value, self.bounds.max_round):
                return None, ""
            return "implausible", f"from {owner}: ready for round {value!r}, not an integer up to {self.bounds.max_round}"
        if parse_record(value, DiLoCoRecordGuard._loose) is None:
            return "schema", f"from {owner}: not a [[round, samples, time], [round, total, hash, role]] record"
        if parse_record(value, self.bounds) is None:
            return "implausible", f"from {owner}: {_describe(value)} is beyond the run's bounds ({self.bounds})"
        return None, ""

    _loose = RecordBounds(max_round=2**63, max_round_samples=2**63)


def _describe(value) -> str:
    return repr(value)[:200]
