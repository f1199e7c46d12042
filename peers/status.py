"""`swarm status`: print the swarm as a table, straight from the DHT; ``--json`` for scripts.

A short-lived DHT client joins through the given peer, reads every peer's signed metrics record
once (waiting up to ``--wait`` seconds for the first), prints them, and leaves.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from peers.lifecycle import StopSignals
from swarm.config.schema import SwarmConfig
from swarm.errors import ConfigError
from swarm.net.admission import certified_run_id
from swarm.net.dht import shutdown_dht
from swarm.telemetry.collector import Collector, SwarmView, start_reader_dht
from swarm.telemetry.text import printable

RETRY_PERIOD = 1.0  # seconds between reads while no record has arrived yet


def run_status(config: SwarmConfig, *, as_json: bool, wait: float) -> None:
    if not config.network.initial_peers:
        raise ConfigError("swarm status needs the address of a peer: --initial-peers /ip4/.../tcp/.../p2p/...")
    stop = StopSignals()
    config = config.model_copy(update={"run_id": certified_run_id(config.peer.certificate, config.run_id)})
    dht = start_reader_dht(config.network, config.run_id, stop=stop.event, certificate=config.peer.certificate)
    try:
        collector = Collector(dht, config.run_id, max_samples_per_second=config.monitor.max_samples_per_second,
                              ban=config.averaging.robust.ban if config.averaging.robust else None)
        deadline = time.monotonic() + wait
        view = collector.collect()
        while not (view.peers or view.left or view.flagged) and time.monotonic() < deadline:
            if stop.event.wait(RETRY_PERIOD):
                break
            view = collector.collect()
        stop.disarm()
    finally:
        shutdown_dht(dht)
    print(json.dumps(view.as_dict(), indent=2) if as_json else format_table(view), flush=True)


COLUMNS = ["PEER", "ROLE", "NAME", "STATE", "EPOCH", "SAMPLES", "SAMPLES/S", "LOSS", "ROUNDS OK/FAILED",
           "REFUSED", "SENT", "RECEIVED", "REACH", "UPTIME"]


def format_table(view: SwarmView) -> str:
    totals = view.totals
    roles = ", ".join(f"{count} {role}" for role, count in sorted(totals["by_role"].items())) or "none"
    lines = [
        f"run {view.run_id}: {totals['peers_online']} peers online ({roles}); epoch {_opt(totals['epoch'])}; "
        f"{totals['samples_per_second']:,.0f} samples/s; loss {_loss(totals['loss'])}",
    ]
    rows = [_row(peer) for peer in view.peers] + [_row(peer) for peer in view.left]
    if rows:
        widths = [max(len(column), *(len(row[index]) for row in rows)) for index, column in enumerate(COLUMNS)]
        lines.append("  ".join(column.ljust(width) for column, width in zip(COLUMNS, widths)).rstrip())
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    else:
        lines.append("no peer of this run has published metrics (is run_id the same as the swarm's?)")
    for peer in view.flagged:
        lines.append(f"flagged {peer['peer_id']} ({printable(peer['display_name'])}): {'; '.join(peer['reasons'])}")
    for peer in view.excluded:
        lines.append(f"excluded {peer['peer_id']}: proven {peer.get('reason', 'equivocation')} ({peer['offences']} offence"
                     f"{'s' if peer['offences'] > 1 else ''}), for {_duration(max(0.0, peer['until'] - view.time))} more")
    lines.append("refused by the peers: " + refusal_summary(totals["refused"], totals["refused_requests"]))
    if view.refused:
        lines.append("refused by this node: " + refusal_summary(view.refused, {}))
    return "\n".join(lines)


def refusal_summary(records: dict[str, int], requests: dict[str, int]) -> str:
    """``N (records: reason n, ...; requests: reason n, ...)``, or ``0``. Reasons come from other peers'
    records, bounded there to short strings of ``[a-z0-9_-]`` (:mod:`swarm.net.refusals`)."""
    total = sum(records.values()) + sum(requests.values())
    kinds = [f"{kind}: " + ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
             for kind, counts in (("records", records), ("requests", requests)) if counts]
    return f"{total} ({'; '.join(kinds)})" if kinds else "0"


def _row(peer: dict) -> list[str]:
    return [
        "…" + peer["peer_id"][-8:],
        peer["role"],
        printable(peer["display_name"]),  # peer-chosen: no terminal escapes
        peer["state"],
        str(peer["epoch"]),
        f"{peer['samples_total']:,}",
        f"{peer['samples_per_second']:,.1f}",
        _loss(peer["loss"]),
        f"{peer['rounds_ok']}/{peer['rounds_failed']}",
        f"{sum(peer['refused'].values()) + sum(peer['refused_requests'].values()):,}",
        _bytes(peer["bytes_sent"]),
        _bytes(peer["bytes_received"]),
        peer["reachability"],
        _duration(peer["uptime"]),
    ]


def _opt(value) -> str:
    return "-" if value is None else str(value)


def _loss(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _bytes(value: Optional[int]) -> str:
    if value is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return "?"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
