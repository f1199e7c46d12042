"""What this peer offers to the members of its current groups, until they have fetched it.

Entries are keyed by ``(group_id, phase, kind, index)``. A peer asking for an entry that is not
there yet waits for it (the RPC handler sends heartbeats meanwhile); entries of a finished group
are dropped after a grace period so that slow members can still fetch them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

from hivemind.proto import runtime_pb2


@dataclass
class Entry:
    payloads: list[runtime_pb2.Tensor]
    header: dict[str, Any] = field(default_factory=dict)


class Outbox:
    """Lives on the service's event loop; not thread-safe by design."""

    def __init__(self, retention: float = 60.0, horizon: float = 600.0):
        self.retention, self.horizon = retention, horizon
        self._entries: dict[Hashable, Entry] = {}
        self._ready: dict[Hashable, asyncio.Event] = {}
        self._created: dict[Hashable, float] = {}
        self._expiry: dict[bytes, float] = {}

    def put(self, key: tuple, entry: Entry) -> None:
        self._entries[key] = entry
        self._event(key).set()

    async def get(self, key: tuple, timeout: float) -> Optional[Entry]:
        """The entry, waiting at most ``timeout`` seconds for it to be put; None if it never came."""
        if key not in self._entries:
            try:
                await asyncio.wait_for(self._event(key).wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._entries.get(key)

    def finish_group(self, group_id: bytes) -> None:
        """Keep a finished group's entries for ``retention`` seconds, then drop them."""
        self._expiry[group_id] = time.monotonic() + self.retention
        self._collect()

    def _event(self, key: tuple) -> asyncio.Event:
        if key not in self._ready:
            self._ready[key] = asyncio.Event()
            self._created[key] = time.monotonic()
        return self._ready[key]

    def _collect(self) -> None:
        """Drop finished groups past retention, and anything older than ``horizon`` (groups this peer
        never finished, or keys that only a stray request asked for)."""
        now = time.monotonic()
        expired = {group_id for group_id, deadline in self._expiry.items() if deadline < now}
        for key, created in list(self._created.items()):
            if key[0] in expired or now - created > self.horizon:
                self._entries.pop(key, None)
                self._ready.pop(key, None)
                del self._created[key]
        for group_id in expired:
            del self._expiry[group_id]
