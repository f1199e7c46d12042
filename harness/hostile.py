"""Hostile members of swarm's all-reduce for fault tests: seams on what a peer serves (its outbox).

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
    def __init__(self, *, stall: bool, retention: float):
        super().__init__(retention=retention)
        self.stall = stall

    async def get(self, key: tuple, timeout: float) -> Optional[Entry]:
        if self.stall and key[2] in STALLED_KINDS:
            await asyncio.sleep(timeout)  # never ready: the service sends the asker a heartbeat and asks again
            return None
        return await super().get(key, timeout)


def make_hostile(service: AveragingService, *, stall: bool = False) -> None:
    """Give ``service`` a hostile outbox; call before its first round."""
    if stall:
        service.outbox = HostileOutbox(stall=stall, retention=service.outbox.retention)
