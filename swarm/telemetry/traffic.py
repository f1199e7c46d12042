"""Bytes a peer sent and received over the network, read from the kernel's TCP counters of its p2pd
and of its own process.

hivemind exposes no traffic counters. A peer's bytes go through its one ``p2pd`` daemon, a child of the
DHT process (DHT, matchmaking, state downloads, round parts over libp2p), or over the direct links of its
own process (round parts between peers that reach each other, :mod:`swarm.net.direct`). The kernel keeps
``bytes_acked`` and ``bytes_received`` for every TCP connection; ``ss -tinp`` (iproute2) prints them
with the owning process. This meter sums them over the connections of both, and keeps the last value it
saw of each connection that has since closed.

What it does not count, so the numbers are a lower bound: bytes moved on a connection after the last
sample before it closed (at most one period's worth), and QUIC/UDP traffic (swarm listens on TCP).
TCP payload includes libp2p's own framing and encryption, which is what the link really carried.
Without ``ss`` (e.g. a slim container) :meth:`TrafficMeter.sample` returns None: unknown, never 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Collection, Optional

from hivemind.utils import get_logger

logger = get_logger(__name__)

_COUNTER_RE = re.compile(r"\b(bytes_acked|bytes_received):(\d+)")
SS_TIMEOUT = 5.0


def find_p2pd(parent_pid: int) -> Optional[int]:
    """The pid of the ``p2pd`` child of ``parent_pid`` (a hivemind DHT process), if there is one."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        if comm.endswith("(p2pd") and int(rest.split()[1]) == parent_pid:
            return int(entry.name)
    return None


def parse_ss(output: str, pid: int | Collection[int]) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(local, peer): (bytes_sent, bytes_received)}`` for the connections of ``pid`` (one or several) in
    ``ss -tinpH`` output."""
    marks = [f"pid={p}," for p in ([pid] if isinstance(pid, int) else pid)]
    connections: dict[tuple[str, str], tuple[int, int]] = {}
    current: Optional[tuple[str, str]] = None
    for line in output.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():  # a socket line: state? recv-q send-q local peer users:(...)
            fields = line.split()
            owned = any(mark in line for mark in marks)
            current = (fields[-3], fields[-2]) if owned and len(fields) >= 5 else None
            continue
        if current is not None:  # the info line under it
            counters = dict(_COUNTER_RE.findall(line))
            connections[current] = (int(counters.get("bytes_acked", 0)), int(counters.get("bytes_received", 0)))
            current = None
    return connections


class TrafficMeter:
    """Cumulative (sent, received) bytes of one p2pd and of this process; call :meth:`sample` periodically."""

    def __init__(self, dht_pid: int):
        self.dht_pid, self.own_pid = dht_pid, os.getpid()
        self._ss = shutil.which("ss")
        self._p2pd: Optional[int] = None
        self._open: dict[tuple[str, str], tuple[int, int]] = {}
        self._closed = (0, 0)
        if self._ss is None:
            logger.info("`ss` (iproute2) is not installed: bytes sent/received are reported as unknown")

    def sample(self) -> Optional[tuple[int, int]]:
        """Bytes sent and received so far, or None if they cannot be measured here."""
        if self._ss is None:
            return None
        if self._p2pd is None:
            self._p2pd = find_p2pd(self.dht_pid)
            if self._p2pd is None:
                return None
        try:
            output = subprocess.run([self._ss, "-tinpH"], capture_output=True, text=True, timeout=SS_TIMEOUT,
                                    check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning(f"could not read TCP counters with ss: {e}")
            return None
        now = parse_ss(output, (self._p2pd, self.own_pid))
        closed_sent, closed_received = self._closed
        for key, (sent, received) in self._open.items():
            new = now.get(key)
            if new is None or new[0] < sent or new[1] < received:  # closed, or closed and its ports reused
                closed_sent, closed_received = closed_sent + sent, closed_received + received
        self._closed, self._open = (closed_sent, closed_received), now
        return (closed_sent + sum(sent for sent, _ in now.values()),
                closed_received + sum(received for _, received in now.values()))
