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


def nat_available() -> Optional[str]:
    """None if :class:`NatLab` can be made here (namespaces and iptables NAT), else the reason why not."""
    if (why := available()) is not None:
        return why
    if subprocess.run(["which", "iptables"], capture_output=True).returncode != 0:
        return "iptables is not installed (a NatLab's routers masquerade with it)"
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
        self._bridge(self.bridge_ns, "br0")
        for host in range(self.hosts):
            self._plug(self.ns(host), f"{self.ip(host)}/24", self.bridge_ns, "br0", f"port{host}", capped=True)
            self._anchor(host, self.ns(host))

    def _bridge(self, ns: str, name: str, address: Optional[str] = None) -> None:
        """A bridge ``name`` in ``ns`` (made if missing), with ``address`` on it if given."""
        if ns not in _run("ip", "netns", "list").stdout.split():
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "link", "add", name, "type", "bridge")
        if address:
            _run("ip", "-n", ns, "addr", "add", address, "dev", name)
        _run("ip", "-n", ns, "link", "set", name, "up")

    def _plug(self, ns: str, address: str, bridge_ns: str, bridge: str, port: str, *, capped: bool) -> None:
        """Make namespace ``ns`` (if missing) with an ``eth0`` holding ``address``, whose veth peer is ``port``
        on ``bridge`` in ``bridge_ns``; ``capped``: tbf at ``rate`` on both ends (each end caps what it sends)."""
        if ns not in _run("ip", "netns", "list").stdout.split():
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        outer, inner = f"swb{self.tag}a{port}", f"swb{self.tag}b{port}"
        _run("ip", "link", "add", outer[:15], "type", "veth", "peer", "name", inner[:15])
        _run("ip", "link", "set", outer[:15], "netns", ns)
        _run("ip", "link", "set", inner[:15], "netns", bridge_ns)
        _run("ip", "-n", ns, "link", "set", outer[:15], "name", "eth0")
        _run("ip", "-n", bridge_ns, "link", "set", inner[:15], "name", port)
        _run("ip", "-n", bridge_ns, "link", "set", port, "master", bridge)
        _run("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
        for where, dev in ((ns, "eth0"), (bridge_ns, port)):
            _run("ip", "-n", where, "link", "set", dev, "up")
            if capped and self.rate and not (self.egress_only and where == bridge_ns):
                _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", self.rate, "burst", self.burst, "latency", self.latency)

    def _anchor(self, key, ns: str) -> None:
        self._anchors[key] = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "infinity"],
                                              stdin=subprocess.DEVNULL, start_new_session=True)

    def namespaces(self) -> list[str]:
        """Every namespace this lab makes (deleted by :meth:`close`)."""
        return [self.ns(host) for host in range(self.hosts)] + [self.bridge_ns]

    def close(self) -> None:
        """Kill every process still in the lab's namespaces (by pid), then delete the namespaces."""
        for proc in self.procs + list(self._anchors.values()):
            kill_group(proc)
        namespaces = self.namespaces()
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


class NatLab(Lab):
    """A public segment and home segments, each home behind a router of its own that masquerades (iptables
    NAT, no port forward), like a home router: a home host reaches the public hosts, nothing reaches it.

    Hosts are numbered as in :class:`Lab`: ``0 .. public-1`` on the public bridge (``10.<net>.0.<i+1>``),
    then the hosts of each home in turn (home ``s``: ``10.<net>.<s+1>.<j+2>``, its router ``.1``). Each
    router has a WAN side on the public bridge (``10.<net>.0.<201+s>``, the address the public hosts see
    home traffic come from) and drops what arrives there unless it belongs to a connection from inside.
    ``rate`` caps the public hosts' links and each home's uplink (the router's WAN link), both directions.

        with NatLab(public=1, homes=(1, 1)) as lab:
            lab.popen(lab.home_host(0), [...])      # a peer at home 0
            lab.router(1, up=False)                 # home 1 loses its internet
    """

    def __init__(self, public: int = 1, homes: Sequence[int] = (1, 1), *, rate: Optional[str] = None, **link):
        super().__init__(public + sum(homes), rate=rate, **link)
        self.public, self.homes = public, tuple(homes)
        self.segment: dict[int, tuple[int, int]] = {}  # home host -> (home, index in it)
        host = public
        for home, count in enumerate(self.homes):
            for index in range(count):
                self.segment[host] = (home, index)
                host += 1

    def router_ns(self, home: int) -> str:
        return f"swb{self.tag}r{home}"

    def home_host(self, home: int, index: int = 0) -> int:
        return next(host for host, where in self.segment.items() if where == (home, index))

    def ip(self, host: int) -> str:
        if host not in self.segment:
            return super().ip(host)
        home, index = self.segment[host]
        return f"10.{self.net}.{home + 1}.{index + 2}"

    def router_ip(self, home: int) -> str:
        """The router's public (WAN) address: where a home host's connections seem to come from."""
        return f"10.{self.net}.0.{201 + home}"

    def namespaces(self) -> list[str]:
        return super().namespaces() + [self.router_ns(home) for home in range(len(self.homes))]

    def _create(self) -> None:
        self._bridge(self.bridge_ns, "br0")
        for host in range(self.public):
            self._plug(self.ns(host), f"{self.ip(host)}/24", self.bridge_ns, "br0", f"port{host}", capped=True)
            self._anchor(host, self.ns(host))
        for home in range(len(self.homes)):
            router, lan = self.router_ns(home), f"10.{self.net}.{home + 1}"
            self._plug(router, f"{self.router_ip(home)}/24", self.bridge_ns, "br0", f"wan{home}", capped=True)
            self._bridge(router, "lan", f"{lan}.1/24")
            for rule in (("sysctl", "-qw", "net.ipv4.ip_forward=1"),
                         ("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"),
                         ("iptables", "-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate",
                          "ESTABLISHED,RELATED", "-j", "ACCEPT"),
                         ("iptables", "-A", "FORWARD", "-i", "eth0", "-j", "DROP")):
                _run("ip", "netns", "exec", router, *rule)
            self._anchor(("router", home), router)
        for host, (home, _) in self.segment.items():
            self._plug(self.ns(host), f"{self.ip(host)}/24", self.router_ns(home), "lan", f"port{host}", capped=False)
            _run("ip", "-n", self.ns(host), "route", "add", "default", "via", f"10.{self.net}.{home + 1}.1")
            self._anchor(host, self.ns(host))

    def router(self, home: int, *, up: bool) -> None:
        """Take home ``home``'s internet away (``up=False``) or give it back: its router's WAN link."""
        _run("ip", "-n", self.router_ns(home), "link", "set", "eth0", "up" if up else "down")

    def uplink_counters(self, home: int) -> tuple[int, int]:
        """(bytes sent, bytes received) over home ``home``'s uplink (its router's WAN side)."""
        anchor = self._anchors[("router", home)]
        with open(f"/proc/{anchor.pid}/net/dev") as file:
            for line in file.readlines()[2:]:
                name, _, fields = line.partition(":")
                if name.strip() == "eth0":
                    values = fields.split()
                    return int(values[8]), int(values[0])
        raise LabError(f"no eth0 in {self.router_ns(home)}")


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


def _process_tree(root: int):
    """(pid, kind, /proc stat line) of ``root`` and every living descendant; kind is ``peer`` (root
    itself), ``p2pd`` (libp2p daemons) or ``helpers`` (any other child, e.g. hivemind's DHT process)."""
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
        yield pid, "peer" if pid == root else "p2pd" if comm.startswith("p2pd") else "helpers", stat
        stack.extend(children)


def process_tree_cpu(root: Optional[int] = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by ``root`` (default: this process) and its descendants,
    summed by kind (see :func:`_process_tree`). Descendants that already exited are not counted."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {"peer": 0.0, "p2pd": 0.0, "helpers": 0.0}
    for _, kind, stat in _process_tree(root or os.getpid()):
        fields = stat[stat.rindex(")") + 2:].split()
        totals[kind] += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return totals


def process_tree_peak_memory(root: Optional[int] = None) -> dict[str, float]:
    """Peak resident memory (VmHWM, MiB) of ``root`` (default: this process) and its living descendants,
    summed by kind (see :func:`_process_tree`)."""
    totals: dict[str, float] = {"peer": 0.0, "p2pd": 0.0, "helpers": 0.0}
    for pid, kind, _ in _process_tree(root or os.getpid()):
        try:
            with open(f"/proc/{pid}/status") as file:
                peak = next((line.split()[1] for line in file if line.startswith("VmHWM:")), "0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        totals[kind] += int(peak) / 1024
    return totals
