"""Every DHT key the project uses, in one place.

| key | written by | read by | lives |
|---|---|---|---|
| ``{run_id}_progress`` | hivemind.Optimizer's ProgressTracker (sync mode), one signed subkey per peer | every sync-mode trainer (epoch, samples) | hivemind's metadata expiration (~60 s), refreshed |
| ``{run_id}_state_averager``, ``{run_id}_grad_averager`` | hivemind's averagers (sync mode): matchmaking and state-download priorities | the same, in other peers | seconds, refreshed |
| ``{run_id}_diloco_progress`` | each DiLoCo trainer: ``{round, samples, time}`` under its peer id | DiLoCo trainers: swarm samples this round, who takes part | ``PROGRESS_TTL``, refreshed every ~second |
| ``{run_id}_diloco_ready_{round}`` | each DiLoCo trainer when it is ready to average ``round`` | matchmaking: who may lead the round | ``READY_TTL`` |
| ``{run_id}_diloco_state`` | each DiLoCo trainer after every round: ``{round, hash, role, time}`` | state sync: who is ahead, which state the swarm agrees on | ``STATE_TTL``, refreshed |

DiLoCo records are stored under the peer id (base58) as subkey, written by the peer itself.
"""

from __future__ import annotations

PROGRESS_TTL = 30.0
READY_TTL = 120.0
STATE_TTL = 60.0


def diloco_progress(run_id: str) -> str:
    return f"{run_id}_diloco_progress"


def diloco_ready(run_id: str, round_number: int) -> str:
    return f"{run_id}_diloco_ready_{round_number}"


def diloco_state(run_id: str) -> str:
    return f"{run_id}_diloco_state"
