"""Hostile members of swarm's all-reduce for fault tests: seams on what a peer serves (its outbox).

- ``veto``: its commit reports every part missing. Before issue 11 every member then set the whole
  update to zero.
- ``stall``: it answers every fetch of its inputs and of its reduced part with heartbeats alone, never
  data (a slow member). Before issue 11 each heartbeat reset the reader's timer, so it held the round
  until the round's timeout.

In every other way the peer is honest: it fetches, reduces and applies what it receives.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from swarm.averaging.outbox import Entry, Outbox
from swarm.averaging.service import AveragingService

STALLED_KINDS = ("in", "out")  # what a staller never delivers; its commit it does


class HostileOutbox(Outbox):
    def __init__(self, *, veto: bool, stall: bool, retention: float):
        super().__init__(retention=retention)
        self.veto, self.stall = veto, stall

    def put(self, key: tuple, entry: Entry) -> None:
        if self.veto and key[2] == "commit":
            size = len(self._members.get(key[0], ()))
            entry = Entry(entry.payloads, {**entry.header, "missing": list(range(size))})
        super().put(key, entry)

    async def get(self, key: tuple, timeout: float) -> Optional[Entry]:
        if self.stall and key[2] in STALLED_KINDS:
            await asyncio.sleep(timeout)  # never ready: the service sends the asker a heartbeat and asks again
            return None
        return await super().get(key, timeout)


def make_hostile(service: AveragingService, *, veto: bool = False, stall: bool = False) -> None:
    """Give ``service`` a hostile outbox; call before its first round."""
    if veto or stall:
        service.outbox = HostileOutbox(veto=veto, stall=stall, retention=service.outbox.retention)
