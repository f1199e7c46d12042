"""Emulated hosts for benchmarks and tests: network namespaces on a bridge, links capped with ``tbf`` or not.

Needs root and iproute2 (see /work/shared/ENVIRONMENT.md for the recipe this follows). Each host is a
namespace with one interface ``eth0`` (address ``10.<net>.0.<i+1>/24``) whose veth peer sits on a
bridge in a namespace of its own, so nothing touches the machine's own network. A ``rate`` caps both
directions of every host's link (``tbf`` on the host's ``eth0`` and on its bridge port), like a
full-duplex access link. Names start with ``swb`` plus a per-lab tag, so labs of concurrent runs
(and other people's tests) never collide.

    with Lab(3, rate="100mbit", latency="200ms") as lab:
        proc = lab.popen(0, ["python", "peer.py", "--listen", lab.ip(0)], log=...)
        sent, received = lab.counters(0)
        lab.link(2, up=False)        # cut host 2 off
    # namespaces deleted and every process left in them killed, also on errors and Ctrl-C
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

from harness.processes import read_json

ROOT = Path(__file__).resolve().parents[1]  # programs start here, so that ``python -m benchmarks.X`` resolves


class LabError(RuntimeError):
    pass


def available() -> Optional[str]:
    """None if namespaces can be made here, else the reason why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} (iproute2) is not installed"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result


class Lab:
    """``hosts`` namespaces on one bridge; see the module docstring.

    :param rate: tbf rate of every link in both directions (``None``: uncapped).
    :param burst, latency: tbf's bucket size and queue limit (BASELINES.md: ``burst 64kb`` and
      ``latency 50ms`` or ``200ms``).
    :param egress_only: cap only what hosts send (no tbf on the bridge ports toward the hosts).
    """

    def __init__(self, hosts: int, *, rate: Optional[str] = "100mbit", burst: str = "64kb", latency: str = "50ms",
                 net: int = 0, egress_only: bool = False):
        self.hosts, self.rate, self.burst, self.latency = hosts, rate, burst, latency
        self.egress_only = egress_only
        self.tag = uuid.uuid4().hex[:5]
        self.net = net or (100 + int(self.tag, 16) % 150)
        self.bridge_ns = f"swb{self.tag}br"
        self.procs: list[subprocess.Popen] = []
        self._anchors: dict[int, subprocess.Popen] = {}  # a sleeping process per host: a window on its counters

    # ---- set-up and tear-down --------------------------------------------------------------
    def ns(self, host: int) -> str:
        return f"swb{self.tag}h{host}"

    def ip(self, host: int) -> str:
        return f"10.{self.net}.0.{host + 1}"

    def __enter__(self) -> "Lab":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        _run("ip", "netns", "add", self.bridge_ns)
        _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        _run("ip", "-n", self.bridge_ns, "link", "set", "lo", "up")
        for host in range(self.hosts):
            ns = self.ns(host)
            _run("ip", "netns", "add", ns)
            outer, inner = f"swb{self.tag}a{host}", f"swb{self.tag}b{host}"
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", outer, "netns", ns)
            _run("ip", "link", "set", inner, "netns", self.bridge_ns)
            _run("ip", "-n", ns, "link", "set", outer, "name", "eth0")
            _run("ip", "-n", self.bridge_ns, "link", "set", inner, "name", f"port{host}")
            _run("ip", "-n", self.bridge_ns, "link", "set", f"port{host}", "master", "br0")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            for where, dev in ((ns, "eth0"), (self.bridge_ns, f"port{host}")):
                _run("ip", "-n", where, "link", "set", dev, "up")
                if self.rate and not (self.egress_only and where == self.bridge_ns):
                    _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", self.rate, "burst", self.burst, "latency", self.latency)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self._anchors[host] = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "infinity"],
                                                   stdin=subprocess.DEVNULL, start_new_session=True)

    def close(self) -> None:
        """Kill every process still in the lab's namespaces (by pid), then delete the namespaces."""
        for proc in self.procs + list(self._anchors.values()):
            kill_group(proc)
        namespaces = [self.ns(host) for host in range(self.hosts)] + [self.bridge_ns]
        for ns in namespaces:
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for proc in self.procs + list(self._anchors.values()):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for ns in namespaces:
            _run("ip", "netns", "del", ns, check=False)

    # ---- using it ------------------------------------------------------------------------------
    def command(self, host: int, *program: str) -> tuple[str, ...]:
        """``program`` run inside ``host``'s namespace (a prefix for :class:`harness.processes.PeerProcess`)."""
        return ("ip", "netns", "exec", self.ns(host), *program)

    def popen(self, host: int, args: Sequence[str], *, log: Path, env: Optional[dict] = None) -> subprocess.Popen:
        """Start ``args`` inside host's namespace, in a session (process group) of its own."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.command(host, *args), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.procs.append(proc)
        return proc

    def counters(self, host: int) -> tuple[int, int]:
        """(bytes sent, bytes received) by the host's interface, as the kernel counts them (read through
        /proc of a process inside the namespace: no subprocess, cheap enough to poll)."""
        anchor = self._anchors.get(host)
        if anchor is not None and anchor.poll() is None:
            return interface_bytes(f"/proc/{anchor.pid}/net/dev")
        found = json.loads(_run("ip", "-n", self.ns(host), "-j", "-s", "link", "show", "dev", "eth0").stdout)
        stats = found[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def link(self, host: int, *, up: bool) -> None:
        _run("ip", "-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_all(procs, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except Exception:
            pass
    alive = [proc for proc in procs if proc.poll() is None]
    for proc in alive:
        kill_group(proc)
    return not alive


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (it was started in a session of its own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def interface_bytes(path: str = "/proc/net/dev") -> tuple[int, int]:
    """(sent, received) bytes over every interface but loopback of the calling process's namespace
    (or of the process whose ``/proc/<pid>/net/dev`` is given)."""
    sent = received = 0
    with open(path) as file:
        for line in file.readlines()[2:]:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                continue
            values = fields.split()
            received += int(values[0])
            sent += int(values[8])
    return sent, received


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float, period: float = 0.2) -> Optional[dict]:
    """The JSON a starting peer writes to ``path`` (e.g. its ``--address-file``); None if the peer
    has exited or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while (found := read_json(path)) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(period)
    return found if proc.poll() is None else None


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def process_tree_cpu(root: Optional[int] = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by ``root`` (default: this process) and its descendants,
    summed by kind: ``peer`` (root itself), ``p2pd`` (libp2p daemons), ``helpers`` (any other child,
    e.g. hivemind's DHT process). Descendants that already exited are not counted."""
    root = root or os.getpid()
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {"peer": 0.0, "p2pd": 0.0, "helpers": 0.0}
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/stat") as file:
                stat = file.read()
            children = []
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as file:
                    children += [int(child) for child in file.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        kind = "peer" if pid == root else "p2pd" if comm.startswith("p2pd") else "helpers"
        totals[kind] += seconds
        stack.extend(children)
    return totals
