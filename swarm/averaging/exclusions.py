"""Who this peer does not average with, and until when: consequences of proven equivocation, of a
reducer's result proven far out of its members' bounds (:mod:`swarm.net.bound_evidence`), and of
being proven an outlier (reports by two reducers a round that they clipped a member's input, in
``averaging.robust.ban.outlier_rounds`` rounds: :mod:`swarm.net.outlier_evidence`).

A reducer with verified :class:`~swarm.net.exclusion_record.Evidence` against it (found here by the
all-reduce, or read from any peer's exclusion record in the DHT and verified here again) is excluded
from groups: this peer's averaging service refuses its requests (join, fetch, state download: the
``admit`` path, reason ``excluded``) and its matchmaker neither follows nor waits for it. The time
grows with repeat offences: the n-th distinct offence (distinct round and group) excludes for
``base x 2^(n-1)`` seconds, at most ``cap``, counted from the time the offender itself signed in its
receipts (clamped to now: a receipt dated ahead cannot lengthen it, one dated back was refused when
received). Policy: ``averaging.robust.ban`` (:class:`swarm.config.schema.BanConfig`; null: evidence
still drops the equivocated part, but no one is excluded).
"""

from __future__ import annotations

import threading
from typing import Optional

import hivemind
from hivemind.utils import get_dht_time, get_logger

from swarm.loops import PeriodicLoop
from swarm.net.dht import DHT_CALL_FAILURES
from swarm.net.exclusion_record import Item, excluded_peers, publish_evidence, read_evidence
from swarm.net.outlier_evidence import Clip, OutlierTally

logger = get_logger(__name__)

EXCLUDED = "excluded"  # the refusal reason (swarm.net.refusals.REQUEST_REASONS)
MAX_KNOWN = 256  # evidence items remembered here (the newest are kept): bounds memory against a flood
DHT_TIMEOUT = 10.0


class Exclusions:
    """This peer's view of exclusions. :meth:`add` what the all-reduce proved; :meth:`start` to read and
    publish records in the background every ``refresh_period`` s (without it, only what this peer
    proved itself counts); :meth:`refusal` is what the averaging service's ``admit`` asks.

    :param policy: ``averaging.robust.ban`` (``base`` and ``cap`` seconds); None: exclude no one.
    :param owner: this peer's ``[owner:...]`` tag, under which its record is signed (None: unsigned).
    """

    def __init__(self, *, dht: Optional[hivemind.DHT], run_id: str, policy, owner: Optional[bytes] = None,
                 refresh_period: float = 15.0):
        self.dht, self.run_id, self.policy, self.owner = dht, run_id, policy, owner
        self._lock = threading.Lock()
        self._known: dict[bytes, Item] = {}  # digest -> verified evidence
        self._mine: list[Item] = []  # what this peer found itself: it publishes these
        rounds = policy.outlier_rounds if policy is not None else None
        self._tally = OutlierTally(rounds) if rounds is not None else None
        self._loop = PeriodicLoop(name="exclusions", iteration=self.refresh, period=refresh_period,
                                  retry_on=DHT_CALL_FAILURES, initial_wait=refresh_period)

    def start(self) -> "Exclusions":
        self._loop.start()
        return self

    def check(self) -> None:
        self._loop.check()

    def shutdown(self, timeout: float = 2.0) -> None:
        self._loop.shutdown(timeout)

    def add(self, items: list[Item], *, mine: bool = True) -> int:
        """Remember each item that verifies; returns how many were new. ``mine``: this peer found them
        (it publishes them at once, and at every refresh while they exclude someone)."""
        new, before = [], self.excluded()
        for item in items:
            if item.verify() is not None:
                continue
            with self._lock:
                digest = item.digest()
                if digest in self._known:
                    continue
                self._known[digest] = item
                if len(self._known) > MAX_KNOWN:
                    del self._known[min(self._known, key=lambda key: self._known[key].time)]
                if mine:
                    self._mine = (self._mine + [item])[-MAX_KNOWN:]
            new.append(item)
        after = self.excluded()
        for item in new:  # logged once per offence (another proof of the same one is not news)
            if after.get(item.accused, {}).get("offences", 0) > before.get(item.accused, {}).get("offences", 0) \
                    or self.policy is None:
                until = after.get(item.accused, {}).get("until")
                logger.warning(f"{item.describe()}: proof {'found here' if mine else 'read from the DHT'}; "
                               + (f"excluded for {until - get_dht_time():.0f}s, offence "
                                  f"{after[item.accused]['offences']}" if until else "not excluded (ban: null)"))
                before = after
        if new and mine:
            self._publish()
        return len(new)

    def note_clips(self, clips: list[Clip]) -> int:
        """Count a round's clip reports, each already checked
        (:meth:`~swarm.averaging.accountability.Accountability.check_clips`); evidence they complete is added
        (verified again there, and published). Returns how many new items that made."""
        if self._tally is None:
            return 0
        found = [item for clip in clips if (item := self._tally.add(clip)) is not None]
        return self.add(found) if found else 0

    def refusal(self, peer) -> Optional[str]:
        """``excluded`` while ``peer`` (a PeerID or its base58 text) is excluded, else None."""
        entry = self.excluded().get(str(peer))
        return EXCLUDED if entry is not None and entry["until"] > get_dht_time() else None

    def excluded(self) -> dict[str, dict]:
        """peer id -> {"until": DHT time, "offences": count} for every peer excluded now."""
        if self.policy is None:
            return {}
        with self._lock:
            items = list(self._known.values())
        return excluded_peers(items, base=self.policy.base, cap=self.policy.cap, now=get_dht_time(),
                              outlier_rounds=self.policy.outlier_rounds)

    def refresh(self) -> None:
        """Read every peer's record (each item verified again), and publish this peer's while it excludes someone."""
        self.add(read_evidence(self.dht, self.run_id, timeout=DHT_TIMEOUT), mine=False)
        if self.excluded():
            self._publish()

    def _publish(self) -> None:
        with self._lock:
            mine = list(self._mine)
        if mine and self.policy is not None and self.dht is not None:  # no DHT: it keeps what it found to itself
            ttl = min(self.policy.cap + 60.0, 86400.0)
            publish_evidence(self.dht, self.run_id, self.owner, mine, ttl=ttl)
