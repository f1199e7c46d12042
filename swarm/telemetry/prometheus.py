"""The monitor's Prometheus ``/metrics``: the latest collection as metric families, via prometheus_client.

A custom collector builds the families at scrape time from the monitor's latest :class:`SwarmView`
and its history's per-peer totals, so peers that come and go never leave stale series behind.
Refusals are exported by reason under the reasons this version knows
(:data:`~swarm.net.refusals.RECORD_REASONS`, :data:`~swarm.net.refusals.REQUEST_REASONS`), any other as
``other``: reasons are peer-chosen strings, and each one a peer invents must not become a series.

Per-peer series carry one label, ``peer`` (the peer id, base58 by the record's schema). What a peer
says about itself in free text (name, organization, device, version) and its role are the labels of
one series per peer, ``swarm_peer_info{peer, role, name, organization, device, version} 1``; join on
``peer`` to show them, e.g. ``swarm_peer_loss * on (peer) group_left (name) swarm_peer_info``.
Those strings go through :func:`~swarm.telemetry.text.printable` (no control characters, at most
:data:`INFO_MAX_LENGTH` characters).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from swarm.net.refusals import RECORD_REASONS, REQUEST_REASONS, exported
from swarm.telemetry.collector import SwarmView
from swarm.telemetry.text import printable

PEER_LABELS = ["peer"]
INFO_LABELS = ["peer", "role", "name", "organization", "device", "version"]
INFO_MAX_LENGTH = 64  # characters of a peer-chosen label value (the record's own bound)
BOOTSTRAP_FIELDS = {"uptime", "bytes_sent", "bytes_received"}  # a bootstrap peer does not train
CONTENT_TYPE = CONTENT_TYPE_LATEST


class SwarmCollector(Collector):
    """:param latest: returns the latest view (None before the first collection) and monitor counters.
    :param contributions: returns the history's ``peers`` rows (contribution across restarts)."""

    def __init__(self, latest: Callable[[], tuple[Optional[SwarmView], dict]], contributions: Callable[[], list[dict]]):
        self.latest, self.contributions = latest, contributions

    def collect(self) -> Iterator[Metric]:
        view, stats = self.latest()
        collections = CounterMetricFamily("swarm_monitor_collections", "Collections the monitor made from the DHT")
        collections.add_metric([], stats.get("collections", 0))
        errors = CounterMetricFamily("swarm_monitor_collection_errors", "Collections that failed (DHT unreachable)")
        errors.add_metric([], stats.get("errors", 0))
        yield collections
        yield errors
        if view is None:
            return
        last = GaugeMetricFamily("swarm_monitor_last_collection_timestamp_seconds", "When the latest collection ran")
        last.add_metric([], view.time)
        yield last
        yield from _swarm_families(view)
        yield from _peer_families(view)
        contributed = CounterMetricFamily(
            "swarm_peer_contributed_samples", "Samples a peer trained on, over all its restarts, as the monitor saw it",
            labels=PEER_LABELS)
        for row in self.contributions():
            if row["role"] != "bootstrap":
                contributed.add_metric(_labels(row), row["contributed"])
        yield contributed


def _swarm_families(view: SwarmView) -> Iterator[Metric]:
    totals = view.totals
    online = GaugeMetricFamily("swarm_peers_online", "Peers with a genuine, current metrics record", labels=["role"])
    for role, count in sorted(totals["by_role"].items()):
        online.add_metric([role], count)
    yield online
    for name, help_text, value in [
        ("swarm_samples_per_second", "Training throughput of the whole swarm", totals["samples_per_second"]),
        ("swarm_epoch", "Highest epoch among trainers", totals["epoch"]),
        ("swarm_loss", "Mean training loss of the trainers", totals["loss"]),
        ("swarm_heldout_loss", "Mean held-out loss of the trainers", totals["heldout_loss"]),
        ("swarm_flagged_records", "Records of the latest collection flagged as implausible", len(view.flagged)),
        ("swarm_peers_left", "Peers whose latest record says they left", len(view.left)),
    ]:
        if value is not None:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
    excluded = GaugeMetricFamily("swarm_peers_excluded", "Peers excluded from averaging now for proven "
                                 "equivocation (each proof verified by the monitor)")
    excluded.add_metric([], len(view.excluded))
    yield excluded
    until = GaugeMetricFamily("swarm_peer_excluded_until_timestamp_seconds", "When a peer's exclusion for proven "
                              "equivocation ends (DHT time, about Unix time)", labels=["peer"])
    offences = GaugeMetricFamily("swarm_peer_exclusion_offences", "Proven offences (equivocation, persistent outlier) of an excluded peer",
                                 labels=["peer"])
    for peer in view.excluded:
        until.add_metric([peer["peer_id"]], peer["until"])
        offences.add_metric([peer["peer_id"]], peer["offences"])
    yield until
    yield offences
    refused = CounterMetricFamily("swarm_monitor_refused_records", "Distinct metrics records the monitor's own DHT "
                                  "node refused (signature, schema, size, identity)", labels=["reason"])
    for reason, count in sorted(exported(view.refused, RECORD_REASONS).items()):
        refused.add_metric([reason], count)
    yield refused


def _peer_families(view: SwarmView) -> Iterator[Metric]:
    families = {
        "epoch": GaugeMetricFamily("swarm_peer_epoch", "The peer's local epoch", labels=PEER_LABELS),
        "samples_per_second": GaugeMetricFamily("swarm_peer_samples_per_second", "The peer's throughput",
                                                labels=PEER_LABELS),
        "loss": GaugeMetricFamily("swarm_peer_loss", "The peer's training loss (moving average)", labels=PEER_LABELS),
        "uptime": GaugeMetricFamily("swarm_peer_uptime_seconds", "Seconds since the peer process started",
                                    labels=PEER_LABELS),
        "samples_total": CounterMetricFamily("swarm_peer_samples", "Samples this peer process trained on",
                                             labels=PEER_LABELS),
        "bytes_sent": CounterMetricFamily("swarm_peer_sent_bytes", "TCP bytes the peer sent: its p2pd and its "
                                          "direct links (lower bound)", labels=PEER_LABELS),
        "bytes_received": CounterMetricFamily("swarm_peer_received_bytes", "TCP bytes the peer received: its p2pd "
                                              "and its direct links (lower bound)", labels=PEER_LABELS),
    }
    rounds = CounterMetricFamily("swarm_peer_averaging_rounds", "Gradient averaging rounds by outcome",
                                 labels=PEER_LABELS + ["outcome"])
    refused = CounterMetricFamily("swarm_peer_refused_records", "Distinct DHT records the peer's DHT node refused",
                                  labels=PEER_LABELS + ["reason"])
    refused_requests = CounterMetricFamily("swarm_peer_refused_requests", "Other peers' requests the peer's "
                                           "averaging service refused", labels=PEER_LABELS + ["reason"])
    info = GaugeMetricFamily("swarm_peer_info", "What the peer says about itself; always 1 (join on peer)",
                             labels=INFO_LABELS)
    for peer in view.peers:
        labels = _labels(peer)
        info.add_metric(_info_labels(peer), 1)
        trainer = peer["role"] != "bootstrap"
        for field, family in families.items():
            if peer[field] is not None and (trainer or field in BOOTSTRAP_FIELDS):
                family.add_metric(labels, peer[field])
        if trainer:
            rounds.add_metric(labels + ["ok"], peer["rounds_ok"])
            rounds.add_metric(labels + ["failed"], peer["rounds_failed"])
        for family, counts, known in ((refused, peer["refused"], RECORD_REASONS),
                                      (refused_requests, peer["refused_requests"], REQUEST_REASONS)):
            for reason, count in sorted(exported(counts, known).items()):
                family.add_metric(labels + [reason], count)
    yield info
    yield from families.values()
    yield rounds
    yield refused
    yield refused_requests


def _labels(peer: dict) -> list[str]:
    return [peer["peer_id"]]


def _info_labels(peer: dict) -> list[str]:
    return [peer["peer_id"], peer["role"], *(printable(peer[field], max_length=INFO_MAX_LENGTH, missing="")
                                             for field in ("display_name", "organization", "device", "version"))]


def make_registry(collector: SwarmCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
