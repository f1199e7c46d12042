"""A peer's JSON status file: what scripts, tests and the container health check read.

The file is rewritten atomically whenever the peer reports a change, and at least every ``period``
seconds by a heartbeat thread (a :class:`~swarm.loops.PeriodicLoop`) that also asks the DHT how many peers this one is connected to. So a
fresh ``updated_at`` means the process is alive and its DHT answers, whatever the training loop is
doing (a long averaging round or state download included), and ``connected_peers`` says whether it
is in touch with the swarm. ``swarm health`` (:mod:`peers.health`) turns the two into a verdict.

Fields added to the peer's own ones: ``reachability`` (``direct``, ``relayed`` or ``client``, see
:func:`swarm.net.dht.reachability`), ``connected_peers`` (None if the DHT did not answer),
``initial_peers`` (how many it was given; 0 for the first peer of a swarm, which is healthy alone)
and ``updated_at`` (Unix time of this write).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

import hivemind

from peers.lifecycle import write_json_atomic
from swarm.loops import PeriodicLoop
from swarm.net.dht import count_connected_peers, reachability

HEARTBEAT_PERIOD = 5.0  # seconds between writes when nothing else happens; `swarm health` allows 6x this


class StatusFile:
    """Publishes ``snapshot()`` to ``path``; with ``path=None`` every method does nothing.

    :param snapshot: returns the peer's own fields as a JSON-serializable dict; called from the
      caller's thread on :meth:`publish` and from the heartbeat thread.
    :param period: heartbeat period in seconds.
    """

    def __init__(self, path: Optional[Path], *, dht: hivemind.DHT, snapshot: Callable[[], dict],
                 initial_peers: int, period: float = HEARTBEAT_PERIOD):
        self.path, self.dht, self.snapshot, self.period = path, dht, snapshot, period
        self.initial_peers = initial_peers
        self.connected_peers: Optional[int] = None
        self.reachability = reachability(dht)  # decided when the DHT started; it does not change while it runs
        self._lock = threading.Lock()
        # a write that fails (a full disk) must not kill the peer, but it must be seen: OSError is
        # logged and retried; the DHT's answer is bounded by count_connected_peers, which never raises
        self._loop = PeriodicLoop(name="status-heartbeat", iteration=self._heartbeat, period=period,
                                  startup=self._heartbeat, retry_on=(OSError,))

    def start(self) -> None:
        """Write the first status now (so it exists once this returns; errors are the caller's), then
        keep it fresh."""
        if self.path is not None:
            self._loop.start()

    def publish(self) -> None:
        if self.path is None:
            return
        with self._lock:  # a snapshot taken earlier must never overwrite a later one
            write_json_atomic(self.path, {**self.snapshot(), "reachability": self.reachability,
                                          "connected_peers": self.connected_peers,
                                          "initial_peers": self.initial_peers, "updated_at": time.time()})

    def check(self) -> None:
        """:raises BackgroundError: the heartbeat thread died."""
        self._loop.check()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the heartbeat (before the DHT goes away); :meth:`publish` still works afterwards."""
        self._loop.shutdown(timeout)

    def _heartbeat(self) -> None:
        self.connected_peers = count_connected_peers(self.dht, timeout=self.period)
        self.publish()
