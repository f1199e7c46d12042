"""What this peer's averaging did, for logs, metrics and the status file."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Counters:
    """Averaging outcomes as seen by this peer, for logs and metrics."""

    rounds_ok: int = 0
    rounds_failed: int = 0  # this peer averaged alone or with local gradients instead of with its group
    nonfinite_updates: int = 0  # rounds in which this peer's own update held NaN/Inf
    refused_inputs: int = 0  # parts from others refused (NaN/Inf, malformed)
    clipped_inputs: int = 0  # inputs to this peer's part that robust aggregation clipped (one per member and round)
    capped_weights: int = 0  # ... and whose declared weight it capped
    # the farthest any input to this peer's part came from the others, in robust scales (averaging.robust.radius
    # and beyond is clipped): how much room honest peers leave, for tuning the radius
    peak_distance_ratio: float = 0.0
    refused_requests: dict = field(default_factory=dict)  # requests of others this peer refused, by reason
    # reducers caught returning different results to different members (signed proof; swarm.averaging.accountability)
    equivocations: int = 0
    # reducers caught returning a result far beyond their members' signed input norms (swarm.net.bound_evidence)
    oversized_results: int = 0
    dropped_parts: int = 0  # parts set to zero here: their reducer failed and no member reached held them
    state_downloads: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    extra: dict = field(default_factory=dict)
