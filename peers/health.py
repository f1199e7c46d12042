"""`swarm health`: is this peer alive and connected to the swarm? The container's HEALTHCHECK.

It reads the peer's status file (:mod:`peers.status_file`) and nothing else, so it is cheap: no DHT,
no torch, no hivemind import. A peer is healthy when its status was written within ``max_age``
seconds (the process is alive and its DHT answers), it has not left, and, if it was given initial
peers, it is connected to at least one peer. The first peer of a swarm, given none, is healthy alone.

Exit 0 for healthy and 1 for unhealthy, as Docker's HEALTHCHECK expects; one line on stdout says why
(with ``--json``, one JSON object: ``healthy``, ``reason`` and the peer's ``status`` as it wrote it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

HEALTHY, UNHEALTHY = 0, 1
DEFAULT_MAX_AGE = 30.0  # seconds; the status is rewritten at least every 5 s while the peer runs


def assess(status: Optional[dict], *, now: float, max_age: float = DEFAULT_MAX_AGE) -> tuple[bool, str]:
    """(healthy, one-line reason) for a parsed status file (None when there is none yet)."""
    if status is None:
        return False, "no status yet: the peer has not started (or writes its status elsewhere)"
    who = f"{status.get('role', 'peer')} {str(status.get('peer_id', ''))[-6:]}".strip()
    if status.get("finished"):
        return False, f"{who} has left the swarm"
    age = now - float(status.get("updated_at") or 0.0)
    if age > max_age:
        return False, f"{who}: status is {age:.0f}s old (over {max_age:g}s): the peer is stuck or gone"
    connected = status.get("connected_peers")
    if status.get("initial_peers", 0) and not connected:
        reason = "its DHT did not answer" if connected is None else "connected to no peer"
        return False, f"{who}: not in touch with the swarm ({reason})"
    progress = f", epoch {status['epoch']}, {status.get('samples', 0):,} samples" if "epoch" in status else ""
    return True, f"{who}: connected to {connected or 0} peers{progress}"


def run_health(status_path: Path, *, max_age: float = DEFAULT_MAX_AGE, as_json: bool = False) -> int:
    try:
        status = json.loads(Path(status_path).read_text())
    except FileNotFoundError:
        status, problem = None, None
    except (OSError, json.JSONDecodeError) as e:
        status, problem = None, f"cannot read the status file {status_path}: {e}"
    else:
        problem = None if isinstance(status, dict) else f"the status file {status_path} holds no JSON object"
    if problem is not None:
        healthy, reason, status = False, problem, None
    else:
        healthy, reason = assess(status, now=time.time(), max_age=max_age)
    if as_json:
        print(json.dumps({"healthy": healthy, "reason": reason, "status": status}), flush=True)
    else:
        print(f"{'healthy' if healthy else 'unhealthy'}: {reason}", flush=True)
    return HEALTHY if healthy else UNHEALTHY
