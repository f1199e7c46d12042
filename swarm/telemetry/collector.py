"""Read every peer's metrics record from the DHT and make one swarm-wide view of them.

Records reach this process already checked for signature, schema and identity by the DHT node
(:mod:`swarm.net.keys`). What a peer says about itself can still be implausible; such records are
*flagged*: kept apart with the reasons, never counted in the swarm's totals. Used by `swarm status`
(one collection) and `swarm monitor` (one every ``monitor.period``).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import hivemind
from hivemind.utils import get_dht_time, get_logger

from swarm.config.schema import NetworkConfig
from swarm.errors import ConfigError
from swarm.net.admission import authorizer_for, own_certificate
from swarm.net.certificate_record import CertificateValidator
from swarm.net.dht import DHT_CALL_FAILURES, client_network, start_dht
from swarm.net.exclusion_record import excluded_peers, read_evidence
from swarm.net.identity import load_identity
from swarm.net.keys import metrics_key
from swarm.net.metrics_record import PeerMetrics, parse_metrics
from swarm.net.refusals import read_refusals
from swarm.net.validators import run_validators

logger = get_logger(__name__)

FUTURE_SLACK = 30.0  # seconds a record's time may run ahead of ours (clocks differ, see hivemind's DHT time)
MAX_EPOCH_LEAD = 10  # epochs a trainer may be ahead of every other trainer before it looks made up
GET_TIMEOUT = 30.0
MAX_EXCLUDED_SHOWN = 64  # excluded peers a view lists (and Prometheus exports, one series each)


def start_reader_dht(network: NetworkConfig, run_id: str, *, stop: threading.Event,
                     certificate: Optional[Path] = None) -> hivemind.DHT:
    """A DHT client that reads run ``run_id``'s metrics records (`swarm monitor`, `swarm status`): a fresh
    identity, any free port, and the validators that drop forged records before they reach it.

    :param certificate: a certificate of the run (a private run admits no one without): the client then
      runs as the identity it was issued for (``network.identity_path``).
    :raises ConfigError: a certificate but no identity file.
    """
    if certificate is None:
        identity = load_identity(None)
        return start_dht(client_network(network), identity=identity, client_mode=True, stop=stop,
                         record_validators=run_validators(run_id, identity.private_key))
    if network.identity_path is None:
        raise ConfigError("a certificate admits one peer id: set network.identity_path to the key file it was "
                          "issued for (`swarm id` prints that key's id)")
    identity = load_identity(network.identity_path)
    run, signed = own_certificate(certificate, run=None, peer_id=identity.peer_id)
    return start_dht(client_network(network), identity=identity, client_mode=True, stop=stop,
                     record_validators=run_validators(run_id, identity.private_key) + [CertificateValidator(run)],
                     authorizer=authorizer_for(identity, signed, run))


@dataclass
class SwarmView:
    """One collection: genuine peers, flagged records, refused-record counts and swarm totals."""

    run_id: str
    time: float  # wall-clock time of the collection
    peers: list[dict] = field(default_factory=list)  # genuine records of peers that are online
    left: list[dict] = field(default_factory=list)  # genuine records that say "left"
    flagged: list[dict] = field(default_factory=list)  # implausible records, each with "reasons"
    refused: dict = field(default_factory=dict)  # records this monitor's DHT node refused, by reason
    totals: dict = field(default_factory=dict)
    # peers excluded now for proven equivocation or as persistent outliers (swarm.net.exclusion_record, each
    # proof verified here): {"peer_id", "offences", "until" (DHT time), "reason"}, soonest to end last
    excluded: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def plausibility_problems(metrics: PeerMetrics, previous: Optional[PeerMetrics], *, now: float,
                          max_samples_per_second: float) -> list[str]:
    """Why a signed, well-formed record cannot be true; empty if it can."""
    problems = []
    if metrics.samples_per_second > max_samples_per_second:
        problems.append(f"claims {metrics.samples_per_second:,.0f} samples/s, above "
                        f"monitor.max_samples_per_second ({max_samples_per_second:,.0f})")
    if metrics.samples_total > (metrics.uptime + 1.0) * max_samples_per_second:
        problems.append(f"claims {metrics.samples_total:,} samples in {metrics.uptime:,.0f}s of uptime")
    if metrics.time > now + FUTURE_SLACK:
        problems.append(f"written {metrics.time - now:,.0f}s in the future")
    if previous is not None and metrics.uptime >= previous.uptime and metrics.time > previous.time:
        if metrics.samples_total < previous.samples_total:
            problems.append("samples_total went down although the peer did not restart")
        rate = (metrics.samples_total - previous.samples_total) / (metrics.time - previous.time)
        if rate > max_samples_per_second:
            problems.append(f"samples_total grew by {rate:,.0f} samples/s since its previous record")
    return problems


def totals_of(peers: list[dict]) -> dict:
    """Swarm-wide figures over genuine records of peers that are online."""
    trainers = [peer for peer in peers if peer["role"] != "bootstrap"]
    by_role: dict[str, int] = {}
    for peer in peers:
        by_role[peer["role"]] = by_role.get(peer["role"], 0) + 1
    losses = [peer["loss"] for peer in trainers if peer["loss"] is not None]
    heldout = [peer["heldout_loss"] for peer in trainers if peer["heldout_loss"] is not None]
    sent = [peer["bytes_sent"] for peer in peers if peer["bytes_sent"] is not None]
    received = [peer["bytes_received"] for peer in peers if peer["bytes_received"] is not None]
    return dict(
        peers_online=len(peers),
        by_role=by_role,
        trainers=len(trainers),
        samples_per_second=sum(peer["samples_per_second"] for peer in trainers if peer["state"] == "running"),
        epoch=max((peer["epoch"] for peer in trainers), default=None),
        loss=statistics.fmean(losses) if losses else None,
        heldout_loss=statistics.fmean(heldout) if heldout else None,
        samples_total=sum(peer["samples_total"] for peer in trainers),
        rounds_ok=sum(peer["rounds_ok"] for peer in trainers),
        rounds_failed=sum(peer["rounds_failed"] for peer in trainers),
        bytes_sent=sum(sent) if sent else None,
        bytes_received=sum(received) if received else None,
        # what the peers report refusing, by reason (one bad record refused by 3 peers counts 3)
        refused=_summed(peer["refused"] for peer in peers),
        refused_requests=_summed(peer["refused_requests"] for peer in peers),
    )


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for each in counts:
        for reason, count in each.items():
            total[reason] = total.get(reason, 0) + count
    return total


class Collector:
    """Collects the swarm's records through a DHT node; remembers each peer's previous record."""

    def __init__(self, dht: hivemind.DHT, run_id: str, *, max_samples_per_second: float, ban=None):
        """:param ban: the run's ``averaging.robust.ban`` (base and cap seconds), to say who is excluded
          until when (:attr:`SwarmView.excluded`); None: the run excludes no one."""
        self.dht, self.run_id, self.max_samples_per_second = dht, run_id, max_samples_per_second
        self.ban = ban
        self._previous: dict[str, PeerMetrics] = {}

    def collect(self) -> SwarmView:
        raw = self.dht.get(metrics_key(self.run_id), latest=True, return_future=True).result(GET_TIMEOUT)
        genuine, refused = parse_metrics(raw)
        counts = dict(self.dht.run_coroutine(read_refusals)["counts"])
        for item in refused:  # normally none: the DHT node drops them first
            counts[item["reason"]] = counts.get(item["reason"], 0) + 1
        now, evidence = get_dht_time(), []
        if self.ban is not None:
            try:
                evidence = read_evidence(self.dht, self.run_id, timeout=GET_TIMEOUT)
            except DHT_CALL_FAILURES as e:  # the metrics still make a view; exclusions come with the next one
                logger.warning(f"could not read the exclusion records ({e!r})")
        return self.assemble(genuine, counts, now=now, excluded=self.excluded(evidence, now))

    def excluded(self, evidence, now: float) -> list[dict]:
        """Who ``evidence`` (verified items) excludes at ``now``, as :attr:`SwarmView.excluded` lists them
        (at most :data:`MAX_EXCLUDED_SHOWN`, those excluded longest first)."""
        if self.ban is None:
            return []
        found = excluded_peers(evidence, base=self.ban.base, cap=self.ban.cap, now=now,
                               outlier_rounds=self.ban.outlier_rounds)
        rows = [{"peer_id": peer, **entry} for peer, entry in found.items()]
        return sorted(rows, key=lambda row: (-row["until"], row["peer_id"]))[:MAX_EXCLUDED_SHOWN]

    def assemble(self, genuine: list[tuple[str, PeerMetrics]], refused: dict, *, now: float,
                 collected_at: Optional[float] = None, excluded: Optional[list[dict]] = None) -> SwarmView:
        """:param now: DHT time, to judge the records' own times; :param collected_at: wall-clock time of the view."""
        view = SwarmView(run_id=self.run_id, time=time.time() if collected_at is None else collected_at, refused=refused,
                         excluded=excluded or [])
        plausible: list[PeerMetrics] = []
        for peer_id, metrics in sorted(genuine, key=lambda item: item[0]):
            problems = plausibility_problems(metrics, self._previous.get(peer_id), now=now,
                                             max_samples_per_second=self.max_samples_per_second)
            self._previous[peer_id] = metrics
            if problems:
                view.flagged.append({**metrics.dict(), "reasons": problems})
            else:
                plausible.append(metrics)
        for metrics in plausible:
            lead = self._epoch_lead(metrics, plausible)
            if lead is not None:
                view.flagged.append({**metrics.dict(), "reasons": [lead]})
            elif metrics.state == "left":
                view.left.append(metrics.dict())
            else:
                view.peers.append({**metrics.dict(), "age": max(0.0, now - metrics.time)})
        view.totals = totals_of(view.peers)
        return view

    @staticmethod
    def _epoch_lead(metrics: PeerMetrics, peers: list[PeerMetrics]) -> Optional[str]:
        others = [peer.epoch for peer in peers if peer.role != "bootstrap" and peer.peer_id != metrics.peer_id]
        if metrics.role == "bootstrap" or not others or metrics.epoch <= max(others) + MAX_EPOCH_LEAD:
            return None
        return f"claims epoch {metrics.epoch}, more than {MAX_EPOCH_LEAD} ahead of every other trainer ({max(others)})"
