"""Gather the peers of one round into one group, led by the ready peer of the lowest rank.

A peer's rank in a round is a hash of the run, the round and its peer id (:func:`leader_rank`), so
the leader changes from round to round and no one can lead every round by choosing its own id (an
Ed25519 id sorts below every RSA id; a smallest-id rule let it lead always).
A peer ready to average round ``r`` announces itself in the DHT (``keys.diloco_ready``, a signed record
whose value is the round) and asks
the lowest-ranked ready peer it knows to take it in. That leader waits until every peer expected in the
round (alive and not ahead of it, as the caller's progress records tell) has joined, or the deadline
passes, then seals the group and tells every member. A peer that died stops being expected once its
progress record goes stale, so a death costs a few seconds, not the deadline. A leader that learns
of a smaller ready peer hands its followers over to it; a leader that does not answer within
``request_timeout`` is skipped. Join replies stream heartbeats, so a leader cut off from the network
is noticed within ``request_timeout``.

The round just averaged is better evidence than a progress record, so it amends ``expected`` for the
next round (:meth:`Matchmaker.remember`): a member that failed to answer in round ``r`` is neither
waited for, nor followed, nor taken in by this peer in round ``r + 1`` (a dead or cut-off peer whose
record still looks fresh cannot hold the survivors up, and a member that heartbeats without delivering
cannot stall two rounds in a row), and a member that answered is waited for during ``partner_grace``
seconds even if its record looks stale. The latter is what a vanished member does to the others' records: every DHT
call that reaches for the unreachable node waits out hivemind's request timeout (a store twice), so the
survivors' heartbeats come seconds late just when they start the next round, and a leader that took
its partner for gone sealed a group of one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time, get_logger
from hivemind.utils.asyncio import aiter_with_timeout

from swarm.averaging import wire
from swarm.averaging.group import MAX_WEIGHT, Group, RoundMissed
from swarm.net import keys
from swarm.net.signed_record import peer_of_subkey

logger = get_logger(__name__)

READY_RECHECK = 1.0  # seconds between a leader's looks for a lower-ranked ready peer
# How long after a round a member that answered in it is waited for in the next one. A partner's
# announcement and look-up are a DHT store and a get, each of which may wait out hivemind's 3 s request
# timeout once or twice while a vanished member is still in the routing tables: about 12 s, plus a margin.
PARTNER_GRACE = 15.0


def leader_rank(run_id: str, round_number: int, peer: PeerID) -> bytes:
    """Who leads a round: the ready peer with the smallest rank. The same on every peer, different in
    every round, and not chosen by picking one's id."""
    return hashlib.sha256(f"{run_id}:{round_number}:".encode() + peer.to_bytes()).digest()


@dataclass(frozen=True)
class _Outcome:
    """What this peer's all-reduce of a round showed about the other members of its group."""

    round: int
    answered: frozenset[PeerID]
    gone: frozenset[PeerID]
    ended: float  # time.monotonic()


@dataclass
class _Lead:
    members: dict[PeerID, float]  # member -> declared weight
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    group: Optional[Group] = None
    redirect: Optional[PeerID] = None


class Matchmaker:
    """Runs on the averaging service's event loop.

    :param get_stub: callable(peer_id) -> stub of the remote averaging servicer.
    :param request_timeout: silence after which a leader counts as gone.
    :param owner: this peer's ``[owner:<RSA key>]`` tag: its ready record is signed under it (see
      :func:`swarm.net.signed_record.owner_tag`); None: stored under the plain peer id, unsigned.
    :param admit: peer -> None if it may take part, else why not; a peer it refuses is never a leader here.
    :param partner_grace: seconds after a round during which its members that answered are waited for
      in the next round whatever their records say. Longer protects pairs of survivors on a slow DHT;
      it is also what a partner that leaves right after a round costs the next one.
    """

    def __init__(self, *, dht: hivemind.DHT, peer_id: PeerID, run_id: str, get_stub, request_timeout: float,
                 owner: Optional[bytes] = None, admit: Optional[Callable[[PeerID], Optional[str]]] = None,
                 partner_grace: float = PARTNER_GRACE):
        self.dht, self.peer_id, self.run_id, self.get_stub = dht, peer_id, run_id, get_stub
        self.owner, self.admit = owner, admit
        self.request_timeout, self.partner_grace = request_timeout, partner_grace
        self._outcome: Optional[_Outcome] = None  # of the latest round this peer averaged in a group
        self._leading: dict[int, _Lead] = {}
        self._sealed: dict[int, Group] = {}
        self._following: dict[int, PeerID] = {}
        self._role_changed = asyncio.Event()  # set whenever this peer starts leading or following a round

    async def form_group(self, round_number: int, *, weight: float, expected: Callable[[], set[PeerID]],
                         deadline: float) -> Group:
        """Join (or lead) the group of ``round_number``; ``deadline`` is a ``time.monotonic()`` value.

        :param expected: callable returning the peers a leader should wait for (re-read while waiting,
          since peers report their progress as they go).

        :raises RoundMissed: the round was sealed without this peer, or nobody answered in time.
        """
        await self._announce(round_number)
        excluded = set(self._previous(round_number).gone)  # never followed, nor handed over to
        suggested: Optional[PeerID] = None
        while time.monotonic() < deadline:
            if suggested is not None and suggested not in excluded:
                leader, suggested = suggested, None
            else:
                ready = (await self._ready_peers(round_number)) | {self.peer_id}
                leader = min(ready - excluded, key=lambda peer: self.rank(round_number, peer))
            if leader == self.peer_id:
                outcome = await self._lead(round_number, weight, expected, deadline, excluded)
                if isinstance(outcome, Group):
                    return outcome
                suggested = outcome
                continue
            self._set_role(round_number, follow=leader)
            code, payload = await self._ask_to_join(leader, round_number, weight, deadline)
            if code == "group":
                return payload
            if code == "not_leader":
                suggested = payload
            elif code == "closed":
                raise RoundMissed(f"round {round_number} was sealed without this peer")
            else:
                logger.info(f"leader {leader} of round {round_number} unavailable ({code}: {payload}); trying another")
                excluded.add(leader)
        raise RoundMissed(f"no group for round {round_number} before the deadline")

    def rank(self, round_number: int, peer: PeerID) -> bytes:
        return leader_rank(self.run_id, round_number, peer)

    def remember(self, group: Group, gone: Collection[int]) -> None:
        """Note which members of ``group`` failed to answer this peer's all-reduce (indices, as in
        :attr:`AllreduceResult.gone`) and which answered; round ``group.round + 1`` goes by it. Several
        all-reduces of one group (PowerSGD's phases) add up: gone in one means gone."""
        lost = {group.members[index] for index in gone}
        if self._outcome is not None and self._outcome.round == group.round:
            lost |= self._outcome.gone
        others = {peer for _, peer in group.others()}
        self._outcome = _Outcome(group.round, frozenset(others - lost), frozenset(lost), time.monotonic())

    def _previous(self, round_number: int) -> _Outcome:
        """The outcome of round ``round_number - 1`` here (empty if this peer did not average in it)."""
        if self._outcome is not None and self._outcome.round == round_number - 1:
            return self._outcome
        return _Outcome(round_number - 1, frozenset(), frozenset(), 0.0)

    def _awaited(self, round_number: int, expected: Callable[[], set[PeerID]]) -> set[PeerID]:
        """Whom a leader of ``round_number`` waits for: ``expected()``, less the members that failed to
        answer in the previous round, plus those that answered in it (during ``partner_grace``)."""
        previous = self._previous(round_number)
        awaited = set(expected()) - previous.gone
        if time.monotonic() - previous.ended < self.partner_grace:
            awaited |= previous.answered
        if self.admit is not None:  # a peer this one refuses (revoked, excluded) would never join: not waited for
            awaited = {peer for peer in awaited if self.admit(peer) is None}
        return awaited

    def forget(self, round_number: int) -> None:
        """Drop the bookkeeping of rounds up to ``round_number``."""
        for table in (self._leading, self._sealed, self._following):
            for old in [number for number in table if number <= round_number - 2]:
                del table[old]

    async def handle_join(self, round_number: int, peer: PeerID, weight: float):
        """Answer a join request (an async generator of reply dicts, streamed by the servicer)."""
        if round_number in self._sealed:
            group = self._sealed[round_number]
            yield self._group_reply(group) if peer in group.members else {"code": "closed"}
            return
        lead = await self._wait_for_role(round_number)
        if lead is None:
            if round_number in self._following:
                yield {"code": "not_leader", "leader": self._following[round_number].to_bytes()}
            else:  # not taking part in this round: the asker will try someone else
                yield {"code": "unavailable"}
            return
        if peer in self._previous(round_number).gone:  # it failed to answer this leader in the previous round
            logger.info(f"round {round_number}: not taking in {peer}, which failed to answer in the previous round")
            yield {"code": "closed"}
            return
        lead.members[peer] = weight
        lead.changed.set()
        yield {"code": "accepted"}
        while not lead.done.is_set():
            try:
                await asyncio.wait_for(lead.done.wait(), self.request_timeout / 3)
            except asyncio.TimeoutError:
                yield wire.HEARTBEAT
        if lead.group is not None:
            yield self._group_reply(lead.group) if peer in lead.group.members else {"code": "closed"}
        else:
            yield {"code": "not_leader", "leader": lead.redirect.to_bytes()}

    async def _wait_for_role(self, round_number: int) -> Optional[_Lead]:
        """A join may arrive just before this peer, ready itself, has decided whether it leads the round:
        give it ``request_timeout`` to decide. Returns the lead if it leads, None otherwise."""
        deadline = time.monotonic() + self.request_timeout
        while round_number not in self._leading and round_number not in self._following:
            if round_number in self._sealed or time.monotonic() >= deadline:
                break
            self._role_changed.clear()
            try:
                await asyncio.wait_for(self._role_changed.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        return self._leading.get(round_number)

    def _set_role(self, round_number: int, *, lead: Optional[_Lead] = None, follow: Optional[PeerID] = None) -> None:
        if lead is not None:
            self._following.pop(round_number, None)
            self._leading[round_number] = lead
        if follow is not None:
            self._following[round_number] = follow
        self._role_changed.set()

    async def _lead(self, round_number: int, weight: float, expected: Callable[[], set[PeerID]], deadline: float,
                    excluded: set[PeerID]):
        """Gather the group; returns it, or the smaller ready peer to defer to. Two peers that announced
        at the same moment may both start leading; the larger one sees the smaller one's announcement
        within ``READY_RECHECK`` seconds and hands its followers over."""
        lead = self._leading.get(round_number) or _Lead(members={self.peer_id: weight})
        self._set_role(round_number, lead=lead)
        next_check = 0.0
        while True:
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + READY_RECHECK
                mine = self.rank(round_number, self.peer_id)
                smaller = [peer for peer in await self._ready_peers(round_number)
                           if self.rank(round_number, peer) < mine and peer not in excluded]
                if smaller:
                    lead.redirect = min(smaller, key=lambda peer: self.rank(round_number, peer))
                    del self._leading[round_number]
                    lead.done.set()
                    return lead.redirect
            if time.monotonic() >= deadline or self._awaited(round_number, expected) <= lead.members.keys():
                break
            lead.changed.clear()
            try:  # wake on a join, or now and then to re-read who is expected
                await asyncio.wait_for(lead.changed.wait(), min(0.25, max(0.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                pass
        members = tuple(sorted(lead.members, key=lambda peer: peer.to_bytes()))
        weights = tuple(lead.members[peer] for peer in members)
        group = Group(round_number, os.urandom(16), members, members.index(self.peer_id), weights)
        self._sealed[round_number] = lead.group = group
        del self._leading[round_number]
        lead.done.set()
        return group

    async def _ask_to_join(self, leader: PeerID, round_number: int, weight: float, deadline: float):
        try:
            stub = self.get_stub(leader)
            request = wire.request(round=round_number, weight=weight)
            stream = await asyncio.wait_for(stub.rpc_join(request), self.request_timeout)
            async for message in aiter_with_timeout(stream, self.request_timeout):
                fields = wire.metadata_of(message)
                code = fields.get("code")
                if fields == wire.HEARTBEAT or code == "accepted":
                    if time.monotonic() > deadline:
                        return "failed", "deadline"
                    continue
                if code == "group":
                    return "group", self._parse_group(round_number, fields)
                if code == "not_leader":
                    return "not_leader", PeerID(fields["leader"])
                return code or "failed", fields
            return "failed", "stream ended"
        except (asyncio.TimeoutError, wire.ProtocolError, ConnectionError, OSError, Exception) as e:
            return "failed", repr(e)

    def _parse_group(self, round_number: int, fields: dict) -> Group:
        members = tuple(PeerID(raw) for raw in fields["members"])
        weights = tuple(float(w) for w in fields["weights"])
        if self.peer_id not in members or list(members) != sorted(members, key=lambda peer: peer.to_bytes()):
            raise wire.ProtocolError("a group that does not include this peer, or is not sorted")
        if len(weights) != len(members) or not all(0 <= w <= MAX_WEIGHT for w in weights):
            raise wire.ProtocolError("a group whose weights do not match its members")
        return Group(round_number, bytes(fields["group_id"]), members, members.index(self.peer_id), weights)

    @staticmethod
    def _group_reply(group: Group) -> dict:
        return {"code": "group", "group_id": group.group_id, "members": [peer.to_bytes() for peer in group.members],
                "weights": list(group.weights)}

    async def _announce(self, round_number: int) -> None:
        key = keys.diloco_ready(self.run_id)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.dht.store(key, round_number, get_dht_time() + keys.READY_TTL,
                                         subkey=self.owner or self.peer_id.to_base58())
        )

    async def _ready_peers(self, round_number: int) -> set[PeerID]:
        """Peers whose latest (signed) ready record names this round."""
        key = keys.diloco_ready(self.run_id)
        found = await asyncio.get_running_loop().run_in_executor(None, lambda: self.dht.get(key, latest=True))
        peers = set()
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                peer = peer_of_subkey(subkey)
                if peer is None or getattr(item, "value", None) != round_number or type(item.value) is not int:
                    continue
                try:
                    peer_id = PeerID.from_base58(peer)
                except Exception:  # a malformed subkey from a broken or hostile peer
                    continue
                if self.admit is None or self.admit(peer_id) is None:
                    peers.add(peer_id)
        return peers

