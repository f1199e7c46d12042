"""Bring this peer back into the DHT after a partition, by pinging its initial peers every period.

A DHT node drops a peer from its routing table as soon as one request to it fails, so after a
partition both sides have forgotten each other and no lookup crosses over again. While the DHT runs,
:class:`Rejoin` therefore pings the initial peers every ``network.rejoin_period`` seconds: an answer
puts each side back into the other's table, and lookups through the initial peers reach the rest of
the swarm. :func:`swarm.net.dht.start_dht` starts one (as ``dht.rejoin``) and
:func:`swarm.net.dht.shutdown_dht` stops it before the DHT.
"""

from __future__ import annotations

import asyncio
from functools import partial

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_logger
from multiaddr import Multiaddr

from swarm.hivemind_private import dial, ping
from swarm.loops import PeriodicLoop

logger = get_logger(__name__)

PING_SLACK = 30.0  # seconds a round of pings may take beyond the period before it counts as failed


class Rejoin:
    """Pings ``initial_peers`` through ``dht`` every ``period`` seconds until :meth:`shutdown`.

    An initial peer that stops answering is logged once at WARNING, and at INFO once it answers again.
    A round of pings that fails as a whole (the DHT busy or not answering) is logged at WARNING and
    tried again at the next period, as is every other failure of the DHT call: this loop must not be
    the reason a peer leaves the swarm. While the DHT process is gone there is nothing to ping.

    :param period: seconds between rounds of pings (``network.rejoin_period``); shorter brings a
      partitioned peer back sooner, at the cost of one ping per initial peer per period.
    """

    def __init__(self, *, dht: hivemind.DHT, initial_peers: list[str], period: float):
        self.dht, self.initial_peers, self.period = dht, list(initial_peers), period
        self.unreachable: set[str] = set()  # initial peers that did not answer the last round
        # the first round waits one period: the DHT has just joined through these very peers; every failure
        # is retried, the BaseExceptions a DHT call can hand on included (see swarm.net.dht.DHT_CALL_FAILURES)
        self._loop = PeriodicLoop(name="rejoin", iteration=self._ping_all, period=period, initial_wait=period,
                                  retry_on=(Exception, GeneratorExit, asyncio.CancelledError))

    def start(self) -> "Rejoin":
        self._loop.start()
        return self

    def check(self) -> None:
        """:raises BackgroundError: the loop died."""
        self._loop.check()

    def wait_ready(self, timeout: float) -> bool:
        """True once a first round of pings has completed (one period after start)."""
        return self._loop.wait_ready(timeout)

    def is_alive(self) -> bool:
        return self._loop.is_alive()

    def shutdown(self, timeout: float = 3.0) -> bool:
        """Stop pinging; a round in flight is left behind after ``timeout`` seconds (the DHT's shutdown
        ends it). Returns whether the thread ended in time."""
        return self._loop.shutdown(timeout)

    def _ping_all(self) -> None:
        if not self.dht.is_alive():
            return
        failed = self.dht.run_coroutine(partial(_ping_initial_peers, initial_peers=self.initial_peers),
                                        return_future=True).result(self.period + PING_SLACK)
        for maddr, reason in failed.items():
            if maddr not in self.unreachable:
                logger.warning(f"initial peer {maddr} does not answer ({reason}); pinging it every {self.period:g}s")
        for maddr in self.unreachable - failed.keys():
            logger.info(f"initial peer {maddr} answers again")
        self.unreachable = set(failed)


async def _ping_initial_peers(_dht: hivemind.DHT, node, initial_peers: list[str]) -> dict[str, str]:
    """Ping each initial peer, dialing its address first if the ping fails (its address may be
    forgotten). Runs in the DHT's process; returns the peers still unreachable, with the reason."""
    failed = {}
    for maddr in initial_peers:
        address = Multiaddr(maddr)
        peer = PeerID.from_base58(address["p2p"])
        if peer == node.peer_id or await ping(node, peer):
            continue
        try:
            await dial(node, peer, address.decapsulate(f"/p2p/{address['p2p']}"))
            if not await ping(node, peer):
                failed[maddr] = "no answer to a ping"
        except Exception as e:  # still unreachable; the caller logs it and tries again next period
            failed[maddr] = repr(e)
    return failed
