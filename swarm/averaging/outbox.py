"""What this peer offers to the members of its current groups, until they have fetched it.

Entries are keyed by ``(group_id, phase, kind, index)``. A peer asking for an entry that is not
there yet waits for it (the RPC handler sends heartbeats meanwhile); entries of a finished group
are dropped after a grace period so that slow members can still fetch them.

Who may fetch what (:meth:`Outbox.may_fetch`): only the members of the entry's group, and a slice
of this peer's own update (``in``, index ``j``) only the member that reduces part ``j``: another
member has no business with it (it is one peer's individual update, not an average).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

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
        self._members: dict[bytes, tuple] = {}
        self._known: dict[bytes, asyncio.Event] = {}  # set once the group is opened here

    def put(self, key: tuple, entry: Entry) -> None:
        self._entries[key] = entry
        self._event(key).set()

    async def get(self, key: tuple, timeout: float) -> Optional[Entry]:
        """The entry, waiting at most ``timeout`` seconds for it to be put; None if it never came."""
        return await _wait(self._entries, key, lambda: self._event(key), timeout)

    def open_group(self, group_id: bytes, members: tuple) -> None:
        """This peer is in ``group_id`` with ``members`` (in the group's order); call before any put."""
        self._members[group_id] = tuple(members)
        self._group_event(group_id).set()

    async def members(self, group_id: bytes, timeout: float) -> Optional[tuple]:
        """The group's members, waiting at most ``timeout`` s for this peer to open it (a member may
        ask a moment before this peer has heard from the leader); None if it never does."""
        return await _wait(self._members, group_id, lambda: self._group_event(group_id), timeout)

    @staticmethod
    def may_fetch(key: tuple, members: tuple, asker) -> bool:
        _group_id, _phase, kind, index = key
        if asker not in members:
            return False
        return kind != "in" or (0 <= index < len(members) and members[index] == asker)

    def finish_group(self, group_id: bytes) -> None:
        """Keep a finished group's entries for ``retention`` seconds, then drop them."""
        self._expiry[group_id] = time.monotonic() + self.retention
        self._collect()

    def _event(self, key: tuple) -> asyncio.Event:
        if key not in self._ready:
            self._ready[key] = asyncio.Event()
            self._created[key] = time.monotonic()
        return self._ready[key]

    def _group_event(self, group_id: bytes) -> asyncio.Event:
        if group_id not in self._known:
            self._known[group_id] = asyncio.Event()
            self._created[(group_id,)] = time.monotonic()
        return self._known[group_id]

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
                if len(key) == 1:  # a group's membership
                    self._members.pop(key[0], None)
                    self._known.pop(key[0], None)
        for group_id in expired:
            del self._expiry[group_id]


async def _wait(table: dict, key: Hashable, event: Callable[[], asyncio.Event], timeout: float):
    """``table[key]``, waiting at most ``timeout`` s for ``event()`` (set when it is put); None if it never is."""
    if key not in table:
        try:
            await asyncio.wait_for(event().wait(), timeout)
        except asyncio.TimeoutError:
            return None
    return table.get(key)
