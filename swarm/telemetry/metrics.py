"""Publish this peer's signed metrics record to the DHT, every ``metrics.period`` seconds.

The record (:class:`swarm.net.metrics_record.PeerMetrics`) goes under ``{run_id}_metrics`` with this peer's
``[owner:<RSA key>]`` as subkey, so hivemind's RSASignatureValidator signs it and no other peer can
overwrite it. Trainers feed their :class:`~swarm.train.loop.TrainingStatus` (with the collaboration's averaging
counters) through :meth:`update`; the bootstrap peer publishes a record without training numbers,
as a sign of life.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import hivemind
from hivemind.utils import get_dht_time, get_logger

from swarm import __version__
from swarm.config.schema import MetricsConfig, PeerConfig
from swarm.loops import PeriodicLoop
from swarm.net.dht import DHT_CALL_FAILURES, reachability
from swarm.net.identity import Identity
from swarm.net.keys import metrics_key
from swarm.net.metrics_record import PeerMetrics
from swarm.net.refusals import bounded, read_refusals
from swarm.telemetry.traffic import TrafficMeter
from swarm.train.loop import TrainingStatus

logger = get_logger(__name__)

STORE_TIMEOUT = 10.0  # seconds one store may take before the publisher gives up on it
LEFT_RECORD_TTL = 30.0  # a "left" record stays this long, so monitors see the peer leave, not vanish


@dataclass
class PeerFacts:
    """What does not change while the peer runs."""

    role: str  # bootstrap, volunteer or institution
    peer: PeerConfig
    device: Optional[str] = None


class MetricsPublisher:
    """A background thread that stores this peer's record every ``config.period`` seconds.

    Call :meth:`start`, then :meth:`update` whenever there is news (cheap; it only keeps the latest
    status), and :meth:`shutdown` on leaving: it stores a last record with ``state: left``.
    A failed store is logged and retried at the next period; an unexpected error stops the thread and
    is raised (:class:`~swarm.errors.BackgroundError`) by the next :meth:`update` or :meth:`check`.
    """

    def __init__(
        self,
        *,
        dht: hivemind.DHT,
        identity: Identity,
        run_id: str,
        config: MetricsConfig,
        facts: PeerFacts,
    ):
        self.dht, self.identity, self.run_id, self.config, self.facts = dht, identity, run_id, config, facts
        self.owner = identity.owner
        self.traffic = TrafficMeter(dht.pid)
        self.started_at = time.monotonic()
        self.stored = 0  # records stored
        self.failed = 0  # stores that no DHT peer accepted
        self._status: Optional[TrainingStatus] = None
        self._lock = threading.Lock()
        # a store no peer accepted is counted and retried inside _publish, a DHT call that failed is retried
        # here; anything else (a record our own schema refuses: a bug) ends the loop
        self._loop = PeriodicLoop(name="metrics-publisher", iteration=partial(self._publish, ttl=config.ttl),
                                  period=config.period, retry_on=DHT_CALL_FAILURES)

    def start(self) -> "MetricsPublisher":
        self._loop.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """True once the first record was stored (or tried). :raises BackgroundError: the thread died."""
        return self._loop.wait_ready(timeout)

    def update(self, status: TrainingStatus, *, now: bool = False) -> None:
        """Keep ``status`` for the next record; ``now`` publishes it without waiting for the period."""
        self.check()
        with self._lock:
            self._status = status
        if now:
            self._loop.wake()

    def check(self) -> None:
        """:raises BackgroundError: the publishing thread died."""
        self._loop.check()

    def shutdown(self, *, leave: bool = True, timeout: float = STORE_TIMEOUT) -> None:
        """Stop the thread; with ``leave``, then store a last record saying this peer left.

        :param timeout: seconds for each of the two waits (the thread, the last store).
        """
        if not self._loop.shutdown(timeout):
            logger.warning("the metrics publisher is stuck in a store; leaving without a last record")
        elif leave and self._loop.error is None:
            self._publish(state="left", ttl=LEFT_RECORD_TTL, timeout=timeout)

    def record(self, state: Optional[str] = None) -> dict:
        """The record as stored: every field of PeerMetrics, in the exact types its schema demands."""
        with self._lock:
            status = self._status
        averaging = status.averaging if status is not None else {}  # the collaboration's Counters
        traffic = self.traffic.sample()
        if state is None:
            state = "finished" if status is not None and status.finished else "running"
        record = dict(
            peer_id=self.identity.peer_id,
            role=self.facts.role,
            state=state,
            display_name=self.facts.peer.display_name,
            organization=self.facts.peer.organization,
            device=self.facts.device,
            epoch=int(status.epoch) if status else 0,
            samples_total=int(status.samples) if status else 0,
            samples_per_second=float(status.samples_per_second) if status else 0.0,
            loss=_finite_or_none(status.train_loss if status else None),
            heldout_loss=_finite_or_none(status.heldout_loss if status else None),
            bytes_sent=traffic[0] if traffic else None,
            bytes_received=traffic[1] if traffic else None,
            rounds_ok=int(averaging.get("rounds_ok", 0)),
            rounds_failed=int(averaging.get("rounds_failed", 0)),
            refused=bounded(self.dht.run_coroutine(read_refusals)["counts"]),
            refused_requests=bounded(averaging.get("refused_requests", {})),
            reachability=reachability(self.dht),
            uptime=float(time.monotonic() - self.started_at),
            version=__version__,
            time=float(get_dht_time()),
        )
        PeerMetrics.parse_obj(record)  # a record our own schema refuses is a bug here, not in the swarm
        return record

    def _publish(self, *, ttl: float, state: Optional[str] = None, timeout: float = STORE_TIMEOUT) -> None:
        record = self.record(state)
        try:
            stored = self.dht.store(
                metrics_key(self.run_id),
                subkey=self.owner,
                value=record,
                expiration_time=get_dht_time() + ttl,
                return_future=True,
            ).result(timeout)
        except TimeoutError:
            stored = False
        if stored:
            self.stored += 1
        else:
            self.failed += 1
            logger.warning("no DHT peer accepted this peer's metrics record; trying again next period")


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    # NaN never equals itself, so hivemind's SchemaValidator would refuse the whole record
    return float(value) if value is not None and math.isfinite(value) else None
