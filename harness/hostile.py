"""Hostile members of swarm's all-reduce for fault tests: seams on what a peer serves (its outbox).

- ``veto``: its commit reports every part missing. Before issue 11 every member then set the whole
  update to zero.
- ``stall``: it answers every fetch of its inputs and of its reduced part with heartbeats alone, never
  data (a slow member). Before issue 11 each heartbeat reset the reader's timer, so it held the round
  until the round's timeout.
- ``equivocate``: as a reducer, it serves its part's true result to the members at even positions of
  the group and another result (the true one x -10, validly signed if it signs at all) to those at odd
  positions. Without reducer accountability the members then end the round with different models.
- ``garbage``: as a reducer, it serves everyone the same wrong result for its part (Gaussian noise at
  100 times the norm of the true result), validly signed (receipt and statement of its norm): receipts
  agree, so only the bound on results catches it (:mod:`swarm.net.bound_evidence`).

In every other way the peer is honest: it fetches, reduces and applies what it receives.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Optional

import torch
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor

from swarm.averaging import wire
from swarm.averaging.accountability import part_norm
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


GARBAGE_SCALE = 100.0  # a garbage reducer's result: noise at this many times the true result's norm


def make_hostile(service: AveragingService, *, veto: bool = False, stall: bool = False,
                 equivocate: bool = False, garbage: bool = False) -> None:
    """Give ``service`` a hostile outbox (and, to equivocate, a fetch handler that looks at the asker;
    for garbage, an aggregator that returns noise); call before its first round."""
    if veto or stall:
        service.outbox = HostileOutbox(veto=veto, stall=stall, retention=service.outbox.retention)
    if equivocate:
        _equivocate(service)
    if garbage:
        allreduce = service.allreduce

        def garbage_allreduce(group, *args, aggregator, **kwargs):
            return allreduce(group, *args, aggregator=Garbage(aggregator, seed=group.round), **kwargs)

        service.allreduce = garbage_allreduce


class Garbage:
    """An aggregator that computes the true result and returns noise of ``GARBAGE_SCALE`` times its norm."""

    def __init__(self, honest, seed: int):
        self.honest, self.seed = honest, seed

    def aggregate(self, rows: torch.Tensor, weights):
        result = self.honest.aggregate(rows, weights)
        noise = torch.randn(result.vector.shape, generator=torch.Generator().manual_seed(3 * 10**9 + self.seed))
        scale = GARBAGE_SCALE * float(result.vector.norm()) / max(1.0, float(noise.norm()))
        return dataclasses.replace(result, vector=noise * scale)


def _equivocate(service: AveragingService) -> None:
    rounds: dict[bytes, int] = {}  # group id -> round, for the receipts of the other result
    allreduce, serve = service.allreduce, service._serve_fetch

    def remember_round(group, *args, **kwargs):
        rounds[group.group_id] = group.round
        return allreduce(group, *args, **kwargs)

    async def serve_fetch(key: tuple, asker, chunk_bytes: int = wire.CHUNK_BYTES):
        group_id, phase, kind, index = key
        members = service.outbox._members.get(group_id, ())
        if kind != "out" or asker not in members or members[index] != service.peer_id \
                or members.index(asker) % 2 == 0:
            async for message in serve(key, asker, chunk_bytes):
                yield message
            return
        entry = await service.outbox.get(key, 60 * service.chunk_timeout)
        if entry is None:
            return
        payloads = [serialize_torch_tensor(deserialize_torch_tensor(payload) * -10, payload.compression)
                    for payload in entry.payloads]
        header = dict(entry.header)
        if service.accountability is not None:
            round_number, names = rounds.get(group_id, -1), [member.to_base58() for member in members]
            header["receipt"] = service.accountability.receipt(round_number, group_id, phase, index, payloads)
            norm = part_norm([deserialize_torch_tensor(payload) for payload in payloads])
            header["norm"] = service.accountability.sign_norms(round_number, group_id, phase, names, index,
                                                               [norm]).to_wire()
        else:
            header.pop("receipt", None)
        for message in wire.tensor_messages(payloads, chunk_bytes=chunk_bytes, **header):
            yield message

    service.allreduce, service._serve_fetch = remember_round, serve_fetch
