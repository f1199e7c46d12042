"""What a peer refused, by reason: what attacks it has seen, published in its metrics record.

Two kinds, each counted where the refusal happens:

- *records*: DHT records this process's DHT node refused (a forged or oversized metrics record, a
  DiLoCo record beyond the run's bounds...), counted in the DHT process (where validators run) by
  :data:`REFUSALS` and read from it with :func:`read_refusals`;
- *requests*: other peers' requests the averaging service refused (a fetch from outside the group,
  too many open fetches, a second state download...), counted by
  :class:`~swarm.averaging.service.AveragingService`.

Reasons are open strings: the metrics record bounds them (:data:`REASON_PATTERN`, at most
:data:`MAX_REASONS` per kind), so a new reason needs no change to the record or to the monitor. Only
Prometheus, whose series must stay few, names the reasons this version knows (:func:`exported`).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter, deque
from typing import Mapping, Optional

# what a reason may look like in a metrics record (peer-chosen text: short, no markup, no control
# characters; \Z, not $, which would let a trailing newline through)
REASON_PATTERN = r"^[a-z][a-z0-9_-]{0,31}\Z"
MAX_REASONS = 16  # distinct reasons of one kind in one record
OTHER = "other"  # where reasons beyond MAX_REASONS (in a record) or unknown ones (in Prometheus) go
# the reasons this version counts, by kind: Prometheus exports these by name and any other as OTHER
RECORD_REASONS = ("oversized", "unsigned", "bad_signature", "schema", "impersonation", "expiration", "implausible",
                  "forged", "undecodable", "version", "identity",  # records
                  "not-admitted", "revoked", "expired")  # DHT requests in a private run (swarm.net.authorizer)
# not-admitted, revoked, expired, role: a caller a run's admission refuses (swarm.net.admission); excluded: a
# reducer caught equivocating (swarm.averaging.exclusions)
REQUEST_REASONS = ("fetch-limit", "fetch-not-member", "fetch-not-slice", "state-limit",
                   "not-admitted", "revoked", "expired", "role", "excluded")
_REASON_RE = re.compile(REASON_PATTERN)


def bounded(counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` as a metrics record may carry them: a reason the pattern refuses, and every reason
    beyond the ``MAX_REASONS - 1`` largest, is added to :data:`OTHER`."""
    valid = sorted(((reason, count) for reason, count in counts.items() if _REASON_RE.match(reason)),
                   key=lambda item: (-item[1], item[0]))
    if len(valid) <= MAX_REASONS and len(valid) == len(counts):
        return dict(valid)
    kept = dict(valid[:MAX_REASONS - 1])
    rest = sum(counts.values()) - sum(kept.values())
    kept[OTHER] = kept.get(OTHER, 0) + rest
    return kept


def exported(counts: Mapping[str, int], known: tuple[str, ...]) -> dict[str, int]:
    """``counts`` with every reason not in ``known`` summed into :data:`OTHER`: what Prometheus gets, so
    that another peer's made-up reasons cannot create series (each reason is a label value)."""
    result: dict[str, int] = {}
    for reason, count in counts.items():
        label = reason if reason in known else OTHER
        result[label] = result.get(label, 0) + count
    return result


class RefusalLog:
    """Distinct records this process's DHT node refused, by reason. Lives in the DHT process.

    A rogue peer may send a new forgery every second: each distinct record is counted, but only the
    first per (reason, sender) in every ``LOG_PERIOD`` seconds is logged, with how many came since.
    """

    MAX_REMEMBERED = 10_000
    LOG_PERIOD = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: set[bytes] = set()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # (reason, sender) -> (last logged, since)
        self.counts: Counter = Counter()
        self.recent: deque = deque(maxlen=20)

    def add(self, reason: str, item: bytes, sender: str, detail: str) -> Optional[int]:
        """Count a refusal once per distinct ``item`` (a record's subkey and value, a request's access
        token). Returns the number of refusals to mention in a log line now (this one and those held
        back since the last line), or None to stay quiet."""
        digest = hashlib.sha256(item).digest()
        with self._lock:
            if digest in self._seen:
                return None
            if len(self._seen) >= self.MAX_REMEMBERED:
                self._seen.clear()
            self._seen.add(digest)
            self.counts[reason] += 1
            self.recent.append({"reason": reason, "detail": detail})
            now = time.monotonic()
            last, held = self._logged.get((reason, sender), (-float("inf"), 0))
            if now - last < self.LOG_PERIOD:
                self._logged[(reason, sender)] = (last, held + 1)
                return None
            self._logged[(reason, sender)] = (now, 0)
            return held + 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"counts": dict(self.counts), "recent": list(self.recent)}


REFUSALS = RefusalLog()


async def read_refusals(dht, node) -> dict:
    """For ``dht.run_coroutine``: the refusals counted by that DHT's own process."""
    return REFUSALS.snapshot()


def refuse(logger, reason: str, item: bytes, sender: str, detail: str, what: str) -> None:
    """Count one refusal in :data:`REFUSALS` (``item`` identifies what was refused) and log it, at most
    once a minute per (reason, sender), with how many were held back since: one rogue peer can send thousands."""
    to_log = REFUSALS.add(reason, item, sender, detail)
    if to_log is not None:
        repeats = f" ({to_log} such refusals since the last line)" if to_log > 1 else ""
        logger.warning(f"refused {what} ({reason}: {detail}){repeats}")
