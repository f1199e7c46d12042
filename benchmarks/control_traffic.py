"""Control traffic of an idle DiLoCo swarm, broken down by switching its sources off one at a time.

    sudo .venv/bin/python -m benchmarks.control_traffic [--window 60] [--arms ...] [--census]

Every arm is a fresh swarm on the netlab (a bootstrap peer and 3 trainers of ``configs/debug.yaml``, each in
a network namespace, links uncapped). The trainers run DiLoCo with an inner round far longer than the
measurement, so no all-reduce happens: every byte in the window is control traffic (DHT records and
lookups, heartbeats, libp2p). After every trainer reports training, the kernel's counters of every host's
interface are read, then again ``--window`` seconds later. Arms:

- ``reports 1 s``: ``diloco.idle_refresh_period=null``: a progress report every ``diloco.refresh_period`` = 1 s
  (the default until 2026-12-03);
- ``default``: the defaults (a report every ``diloco.idle_refresh_period`` = 10 s while no round nears its end);
- ``default + bootstrap metrics off``: also ``metrics=null`` on the bootstrap peer, whose signed metrics records
  (every ``metrics.period`` = 2 s in the debug config, 10 s in ``configs/default.yaml``) the monitor shows;
- ``default + no rejoin``: also ``network.rejoin_period`` long (the rejoin loop pings the initial peers).

The trainers' own metrics records are off in every arm (``metrics=null``): they cost what the bootstrap's do, each.
(An arm of four bare bootstrap peers was tried as hivemind's floor: 49 KB/s, more than the idle trainers,
because each bootstrap peer signs and publishes its own manifest; it measures something else, so it is not
here.)

Columns: bytes per second sent by all hosts together, by the trainers, by the bootstrap peer; and the
share of the ``reports 1 s`` arm's. Writes ``benchmarks/results/control_traffic.json``.
With ``--census`` every peer runs under ``harness/dht_census.py`` and each arm also prints the DHT requests
all nodes served in the window, by kind and key (what the tracker, the metrics records, the exclusions cost).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.report import environment, markdown_table, write_json
from benchmarks.training import CONFIG
from harness.dht_census import census_command, read_census
from harness.netlab import Lab, available, kill_group, load_average, wait_for_file

TRAINERS = 3
EVERY_SECOND = ["diloco.idle_refresh_period=null"]
ARMS = {  # name -> (--set items of every trainer, --set items of the bootstrap peer)
    "reports 1 s": (EVERY_SECOND, []),
    "default": ([], []),
    "default + bootstrap metrics off": ([], ["metrics=null"]),
    "default + no rejoin": (["network.rejoin_period=3600"], []),
}


def _sets(items) -> list[str]:
    return [word for item in items for word in ("--set", item)]


def _training(status: Path) -> bool:
    try:
        state = json.loads(status.read_text())
    except (OSError, ValueError):
        return False
    return state.get("samples", 0) > 0


def run_arm(arm, work: Path, window: float, timeout: float, census: bool = False) -> dict:
    """One arm; ``census``: every peer runs under :mod:`harness.dht_census`, and the result has the DHT
    requests each node served in the window, by key (requests, request and response bytes, per second)."""
    sets, bootstrap_sets = arm
    swarm = census_command(work) if census else [sys.executable, "-m", "peers"]
    hosts = TRAINERS + 1
    statuses = [work / f"status{host}.json" for host in range(1, hosts)]
    with Lab(hosts, rate=None) as lab:
        address = work / "address.json"
        procs = [lab.popen(0, [*swarm, "bootstrap", "--config", str(CONFIG), "--identity",
                               str(work / "bootstrap.key"), "--address-file", str(address), "--set",
                               f"network.listen_host={lab.ip(0)}", *_sets(bootstrap_sets)], log=work / "bootstrap.log")]
        try:
            started = wait_for_file(address, procs[0], 90)
            if started is None:
                return dict(error=f"the bootstrap peer did not start; see {work / 'bootstrap.log'}")
            maddr = next(m for m in started["maddrs"] if f"/{lab.ip(0)}/" in m)
            for host in range(1, hosts):
                command = [*swarm, "join", "--config", str(CONFIG), "--initial-peers", maddr,
                           "--status-file", str(statuses[host - 1]), "--set", f"network.listen_host={lab.ip(host)}",
                           "--set", "averaging.mode=diloco", "--set", "diloco.inner_steps=1000000",
                           "--set", "metrics=null", "--set", "checkpoint=null"]
                command += _sets(sets)
                procs.append(lab.popen(host, command, log=work / f"peer{host}.log"))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ended = [host for host, proc in enumerate(procs) if proc.poll() is not None]
                if ended:
                    lines = (work / f"peer{ended[0]}.log").read_text().strip().splitlines() if ended[0] else []
                    return dict(error=f"peer {ended[0]} exited early: {lines[-1] if lines else '?'}")
                if all(_training(status) for status in statuses):
                    break
                time.sleep(1)
            else:
                return dict(error=f"the trainers did not start training within {timeout:.0f} s; see {work}")
            time.sleep(10)  # past the first records and state downloads
            before, load_before = [lab.counters(host) for host in range(hosts)], load_average()[0]
            served_before = read_census(work)
            time.sleep(window)
            after, load_after = [lab.counters(host) for host in range(hosts)], load_average()[0]
            served_after = read_census(work)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
    sent = [(a[0] - b[0]) / window for a, b in zip(after, before)]
    served = {name: [(value - before) / window for value, before in zip(counts, served_before.get(name, [0, 0, 0]))]
              for name, counts in served_after.items()}
    return dict(total=sum(sent), trainers=sum(sent[1:]), bootstrap=sent[0], per_host=sent, census=served or None,
                load=(load_before, load_after))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured per arm")
    parser.add_argument("--arms", default=",".join(ARMS), help="which arms, comma-separated")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds an arm may take to start")
    parser.add_argument("--census", action="store_true",
                        help="also count the DHT requests every node serves, by key (harness/dht_census.py)")
    args = parser.parse_args()
    problem = available()
    if problem:
        print(f"control_traffic: {problem}", file=sys.stderr)
        return 2
    names = [name for name in args.arms.split(",") if name]
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        parser.error(f"unknown arm {', '.join(unknown)}; known: {', '.join(ARMS)}")
    results = {}
    with TemporaryDirectory(prefix="swarm-control-") as tmp:
        for number, name in enumerate(names):
            work = Path(tmp) / f"arm{number}"
            work.mkdir()
            results[name] = run_arm(ARMS[name], work, args.window, args.timeout, args.census)
            print(f"{name}: {results[name]}", flush=True)
    base = results.get("reports 1 s", {}).get("total")
    rows = [[name] + (["-"] * 4 + [r["error"]] if "error" in r else
                      [f"{r['total'] / 1e3:.1f}", f"{r['trainers'] / 1e3:.1f}", f"{r['bootstrap'] / 1e3:.1f}",
                       f"{r['total'] / base:.2f}" if base else "-", f"{r['load'][0]:.1f}-{r['load'][1]:.1f}"])
            for name, r in results.items()]
    print(markdown_table(["arm", "all hosts, KB/s sent", "3 trainers", "bootstrap", "vs reports 1 s", "load"], rows))
    for name, r in results.items():
        if r.get("census"):
            print(f"\nDHT requests served in arm {name!r}, all nodes (protobuf bytes, without libp2p's framing):")
            print(markdown_table(["request, key", "per s", "request KB/s", "response KB/s"],
                                 [[key, f"{c[0]:.2f}", f"{c[1] / 1e3:.2f}", f"{c[2] / 1e3:.2f}"]
                                  for key, c in sorted(r["census"].items(), key=lambda kv: -(kv[1][1] + kv[1][2]))]))
    write_json("control_traffic.json", {"environment": environment(), "window": args.window, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
