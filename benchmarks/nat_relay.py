"""What joining from behind NAT costs (issue 13): two trainers at home, through the relay, against the same
two trainers on public addresses, side by side.

    sudo .venv/bin/python -m benchmarks.nat_relay [--rounds 8] [--repeats 2] [--quick]

Real peers in network namespaces (:class:`harness.netlab.NatLab`, links uncapped: time and bytes
matter here): a bootstrap peer on the public segment and 2 DiLoCo trainers (debug model, H=10, fp16),
default network settings, for ``--rounds`` rounds; once with both trainers on the public segment
(``public``: they connect directly), once with each in a home of its own behind a masquerading
router (``home``: they find out with a dial-back, and all their traffic with each other crosses the
relay on the bootstrap peer). Reported per arm: join time (trainer process start to its first
status, the dial-back and the relay's set-up included), seconds per round and bytes per round in the
steady window (what the trainers' interfaces sent), and bytes through the bootstrap peer's link (the
relay's cost; sent and received, over the whole run, joins and state downloads included) per round. Arms alternate, so that a change in the machine's load hits both. Needs root;
prints a table and writes ``benchmarks/results/nat_relay.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.report import arm_medians, environment, markdown_table, write_json
from benchmarks.swarm_ticks import Sampler, window
from harness.netlab import NatLab, kill_group, load_average, nat_available, wait_all, wait_for_file

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "debug.yaml"
SETS = ["averaging.mode=diloco", "averaging.compression=fp16", "diloco.inner_steps=10", "checkpoint=null"]


def run_arm(home: bool, rounds: int, work: Path, timeout: float) -> dict:
    with NatLab(public=3, homes=(1, 1)) as lab:
        hosts = [lab.home_host(0), lab.home_host(1)] if home else [1, 2]
        statuses = [work / f"status{index}.json" for index in range(len(hosts))]
        sampler = Sampler(lab, hosts, statuses).start()
        address = work / "address.json"
        bootstrap = lab.popen(0, [sys.executable, "-m", "peers", "bootstrap", "--config", str(CONFIG),
                                  "--identity", str(work / "bootstrap.key"), "--address-file", str(address),
                                  "--set", f"network.listen_host={lab.ip(0)}"], log=work / "bootstrap.log")
        started = wait_for_file(address, bootstrap, 120)
        if started is None:
            sampler.finish()
            return dict(error=f"the bootstrap peer did not start; see {work / 'bootstrap.log'}")
        maddr = next(m for m in started["maddrs"] if f"/{lab.ip(0)}/" in m)
        relay_before = sum(lab.counters(0))
        trainers, spawned = [], []
        for index, host in enumerate(hosts):
            command = [sys.executable, "-m", "peers", "join", "--config", str(CONFIG), "--initial-peers", maddr,
                       "--status-file", str(statuses[index]), "--set", f"network.listen_host={lab.ip(host)}"]
            for item in SETS + [f"training.max_epochs={rounds}"]:
                command += ["--set", item]
            spawned.append(time.monotonic())
            trainers.append(lab.popen(host, command, log=work / f"trainer{index}.log"))
        finished = wait_all(trainers, timeout)
        ticks = sampler.finish()
        relayed = sum(lab.counters(0)) - relay_before
        kill_group(bootstrap)
    joined = [next((tick["time"] for tick in ticks if tick["states"][index] is not None), None) for index in range(2)]
    steady = window(ticks, "epoch", rounds)
    if steady is None or not finished or None in joined:
        return dict(error=f"the trainers did not finish {rounds} rounds; see {work}")
    reachability = {state.get("reachability") for state in ticks[-1]["states"]}
    steady_rounds = rounds - 1  # from every trainer past round 0 to every trainer at the last
    return dict(join_seconds=statistics.median(join - spawn for join, spawn in zip(joined, spawned)),
                seconds_per_round=steady["seconds"] / steady_rounds, bytes_per_round=steady["bytes"] / steady_rounds,
                relay_bytes_per_round=relayed / rounds, reachability=sorted(map(str, reachability)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="DiLoCo rounds per arm (default 8)")
    parser.add_argument("--quick", action="store_true", help="4 rounds per arm, once")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating (medians reported)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one arm may take")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "nat_relay.json")
    args = parser.parse_args(argv)
    rounds, repeats = (4, 1) if args.quick else (args.rounds, args.repeats)
    results = {"environment": environment(), "rounds": rounds, "arms": {}}
    problem = nat_available()
    if problem is not None:
        print(f"skipped: {problem}", flush=True)
        return 0
    runs: dict[str, list[dict]] = {"public": [], "home": []}
    for _ in range(repeats):
        for name in runs:
            with TemporaryDirectory(prefix=f"nat-{name}-") as work:
                load = load_average()[0]
                runs[name].append({**run_arm(name == "home", rounds, Path(work), args.timeout), "load_before": load})
                print(f"{name}: {runs[name][-1]}", flush=True)
    results["runs"] = runs
    arms = results["arms"] = {name: arm_medians(found) for name, found in runs.items()}
    if all("error" not in arm for arm in arms.values()):
        rows = []
        for key, label in [("join_seconds", "join (s)"), ("seconds_per_round", "s / round"),
                           ("bytes_per_round", "trainer bytes / round"), ("relay_bytes_per_round", "bootstrap bytes / round (whole run)")]:
            ratio = arms["home"][key] / arms["public"][key] if arms["public"][key] else float("nan")
            rows.append([label, f"{arms['public'][key]:,.2f}", f"{arms['home'][key]:,.2f}", f"{ratio:.2f}x"])
        print(markdown_table(["", "public", "home (relay)", "home / public"], rows), flush=True)
    write_json(args.out.name, results, args.out)
    return 0
