"""What admission costs (issue 10): a private run against the same run open, side by side.

    sudo .venv/bin/python -m benchmarks.admission_cost [--rounds 12] [--quick]

1. In one process: what a private run's DHT authorizer (:mod:`swarm.net.authorizer`) adds to every DHT
   request: CPU to sign the request, check it, sign the response and check that (RSA-2048, hivemind's
   token protocol with the certificate as token), and the bytes its auth fields add to a request and
   a response.
2. Real peers in network namespaces (links uncapped: only time, CPU and bytes matter): a bootstrap
   peer serving the run's manifest and 2 DiLoCo trainers (debug model, H=10, 8-bit), joined by the
   run's fingerprint, for ``--rounds`` rounds; once as an open run, once private (every peer with a
   certificate, every DHT request signed and checked, every averaging request checked against the
   certificates). Reported per arm: join time (trainer process start to its first status), seconds
   per round and bytes per round in the steady window (every host's interface counters), and each
   trainer's CPU per round (the peer, its DHT process and its p2pd). Ratios private/open.
Needs root for part 2; prints a table and writes ``benchmarks/results/admission_cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from hivemind.proto import dht_pb2

from benchmarks.report import arm_medians, environment, markdown_table, write_json
from benchmarks.swarm_ticks import Sampler, window
from harness.netlab import Lab, available, kill_group, load_average, process_tree_cpu, wait_all, wait_for_file
from harness.processes import write_json as write_file
from swarm.config.loading import load_config
from swarm.net.authorizer import RunAuthorizer
from swarm.net.certificate import issue_certificate
from swarm.net.identity import load_identity
from swarm.net.manifest import new_manifest
from swarm.net.manifest_record import authority_of, sign_manifest

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "debug.yaml"
SETS = ["averaging.mode=diloco", "averaging.compression=blockwise8", "diloco.inner_steps=10"]
TRAINERS = 2


def authorizer_cost(iterations: int) -> dict:
    """Per DHT request: seconds to sign + check a request and its response, and the bytes added."""
    authority = load_identity(None).private_key
    client, server = load_identity(None), load_identity(None)

    def authorizer(identity):
        certificate = issue_certificate(authority, run_id="bench", admission="private", peer_id=identity.peer_id,
                                        role="volunteer", organization=None, valid_for=3600.0)
        return RunAuthorizer(identity.private_key, certificate, certificate.certificate.fingerprint)

    mine, theirs = authorizer(client), authorizer(server)
    plain_request = dht_pb2.FindRequest(keys=[b"k" * 20], peer=dht_pb2.NodeInfo(node_id=b"n" * 20))
    plain_response = dht_pb2.FindResponse(peer=dht_pb2.NodeInfo(node_id=b"n" * 20))

    async def one() -> tuple[int, int]:
        request, response = dht_pb2.FindRequest(), dht_pb2.FindResponse()
        request.CopyFrom(plain_request)
        response.CopyFrom(plain_response)
        await mine.sign_request(request, None)
        added_request = request.ByteSize() - plain_request.ByteSize()
        assert await theirs.validate_request(request)
        await theirs.sign_response(response, request)
        added_response = response.ByteSize() - plain_response.ByteSize()
        assert await mine.validate_response(response, request)
        return added_request, added_response

    async def run() -> tuple[float, tuple[int, int]]:
        sizes = await one()  # the first check of each token is an RSA verify more; later ones hit the cache
        started = time.process_time()
        for _ in range(iterations):
            await one()
        return (time.process_time() - started) / iterations, sizes

    seconds, (request_bytes, response_bytes) = asyncio.run(run())
    return dict(cpu_ms_per_request=seconds * 1e3, request_bytes_added=request_bytes,
                response_bytes_added=response_bytes)


def make_run(work: Path, private: bool) -> tuple[str, dict[str, tuple[Path, Path]]]:
    """The run's manifest (``work/manifest.json``) and, for a private run, a key and certificate per peer."""
    config = load_config(CONFIG, SETS + [f"training.max_epochs={ROUNDS}"], environ={})
    authority = load_identity(work / "authority.key").private_key
    admission = "private" if private else "open"
    signed = sign_manifest(new_manifest(config, authority=authority_of(authority), admission=admission), authority)
    write_file(work / "manifest.json", signed.as_dict())
    peers = {}
    for name in ["bootstrap"] + [f"trainer{host}" for host in range(1, TRAINERS + 1)]:
        key = work / f"{name}.key"
        identity = load_identity(key)
        certificate = work / f"{name}.cert.json"
        if private:
            role = "bootstrap" if name == "bootstrap" else "volunteer"
            write_file(certificate, issue_certificate(authority, run_id=config.run_id, admission=admission,
                                                      peer_id=identity.peer_id, role=role, organization=None,
                                                      valid_for=86400.0).as_dict())
        peers[name] = (key, certificate if private else None)
    return signed.fingerprint, peers


class CpuWatch:
    """The last CPU seconds seen for each process tree (read every half second: a tree that exits keeps its last value)."""

    def __init__(self, pids: list[int]):
        self.pids, self.seconds = pids, {pid: 0.0 for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for pid in self.pids:
                total = sum(process_tree_cpu(pid).values())
                self.seconds[pid] = max(self.seconds[pid], total)

    def __enter__(self) -> "CpuWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def run_arm(private: bool, work: Path, timeout: float) -> dict:
    fingerprint, peers = make_run(work, private)
    hosts = TRAINERS + 1
    statuses = [work / f"status{host}.json" for host in range(1, hosts)]

    def certified(name: str) -> list[str]:
        key, certificate = peers[name]
        return ["--certificate", str(certificate)] if certificate else []

    with Lab(hosts, rate=None) as lab:
        sampler = Sampler(lab, list(range(hosts)), statuses).start()
        address = work / "address.json"
        bootstrap = lab.popen(0, [
            sys.executable, "-m", "peers", "bootstrap", "--config", str(CONFIG), "--identity", str(peers["bootstrap"][0]),
            "--manifest", str(work / "manifest.json"), *certified("bootstrap"), "--address-file", str(address),
            "--set", f"network.listen_host={lab.ip(0)}"], log=work / "bootstrap.log")
        started = wait_for_file(address, bootstrap, 90)
        if started is None:
            sampler.finish()
            return dict(error=f"the bootstrap peer did not start; see {work / 'bootstrap.log'}")
        maddr = next(m for m in started["maddrs"] if f"/{lab.ip(0)}/" in m)
        trainers, spawned = [], []
        for host in range(1, hosts):
            name = f"trainer{host}"
            command = [sys.executable, "-m", "peers", "join", "--config", str(CONFIG), "--initial-peers", maddr,
                       "--run", fingerprint, *certified(name), "--status-file", str(statuses[host - 1]),
                       "--set", f"network.identity_path={peers[name][0]}", "--set", f"network.listen_host={lab.ip(host)}",
                       "--set", "checkpoint=null"]
            for item in SETS + [f"training.max_epochs={ROUNDS}"]:
                command += ["--set", item]
            spawned.append(time.monotonic())
            trainers.append(lab.popen(host, command, log=work / f"{name}.log"))
        with CpuWatch([trainer.pid for trainer in trainers]) as cpu:
            finished = wait_all(trainers, timeout)
        ticks = sampler.finish()
        kill_group(bootstrap)
    joined = []
    for index, spawn in enumerate(spawned):
        first = next((tick["time"] for tick in ticks if tick["states"][index] is not None), None)
        joined.append(first - spawn if first is not None else None)
    steady = window(ticks, "epoch", ROUNDS)
    if steady is None or not finished:
        return dict(error=f"the trainers did not finish {ROUNDS} rounds; see {work}")
    rounds = ROUNDS - 1  # the steady window: from every trainer past round 0 to every trainer at the last
    return dict(join_seconds=statistics.median(joined), seconds_per_round=steady["seconds"] / rounds,
                bytes_per_round=steady["bytes"] / rounds,
                cpu_seconds_per_round=statistics.median(cpu.seconds.values()) / ROUNDS,
                refused=(work / "trainer1.log").read_text().count("not-admitted"))


def main(argv: list[str] | None = None) -> int:
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="DiLoCo rounds per arm (default 16)")
    parser.add_argument("--quick", action="store_true", help="8 rounds per arm")
    parser.add_argument("--requests", type=int, default=300, help="DHT requests timed in part 1")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one arm may take")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating (medians reported)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "admission_cost.json")
    args = parser.parse_args(argv)
    ROUNDS = 8 if args.quick else args.rounds
    results = {"environment": environment(), "authorizer": authorizer_cost(args.requests), "arms": {}}
    auth = results["authorizer"]
    print(f"DHT authorizer: {auth['cpu_ms_per_request']:.2f} ms CPU per request (sign + check the request and its "
          f"response, one process); +{auth['request_bytes_added']} bytes per request, "
          f"+{auth['response_bytes_added']} per response", flush=True)
    problem = available()
    if problem is not None:
        print(f"part 2 skipped: {problem}", flush=True)
    else:
        runs: dict[str, list[dict]] = {"open": [], "private": []}
        for _ in range(args.repeats):  # alternating, so that a change in the machine's load hits both arms
            for name, private in (("open", False), ("private", True)):
                with TemporaryDirectory(prefix=f"admission-{name}-") as work:
                    load = load_average()[0]
                    runs[name].append({**run_arm(private, Path(work), args.timeout), "load_before": load})
                    print(f"{name}: {runs[name][-1]}", flush=True)
        results["runs"] = runs
        arms = results["arms"] = {name: arm_medians(found) for name, found in runs.items()}
        if all("error" not in arm for arm in arms.values()):
            rows = []
            for key, label in [("join_seconds", "join (s)"), ("seconds_per_round", "s / round"),
                               ("bytes_per_round", "bytes / round"), ("cpu_seconds_per_round", "trainer CPU-s / round")]:
                ratio = arms["private"][key] / arms["open"][key] if arms["open"][key] else float("nan")
                rows.append([label, f"{arms['open'][key]:,.2f}", f"{arms['private'][key]:,.2f}", f"{ratio:.2f}x"])
            print(markdown_table(["", "open", "private", "private / open"], rows), flush=True)
    write_json(args.out.name, results, args.out)
    return 0
