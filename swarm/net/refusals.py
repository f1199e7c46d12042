"""Records (and requests) this process's DHT node refused, by reason: what attacks a peer has seen.

Counted in the DHT process (where validators run) and read from it with :func:`read_refusals`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, deque
from typing import Optional

from hivemind.dht.validation import DHTRecord


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

    def add(self, reason: str, record: DHTRecord, sender: str, detail: str) -> Optional[int]:
        """Count a refusal once per distinct record. Returns the number of refusals to mention in a log
        line now (this one and those held back since the last line), or None to stay quiet."""
        return self.add_item(reason, record.subkey + b"\0" + record.value, sender, detail)

    def add_item(self, reason: str, item: bytes, sender: str, detail: str) -> Optional[int]:
        """:meth:`add` for anything refused that ``item`` identifies (e.g. a request's access token)."""
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
