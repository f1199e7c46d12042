"""One averaging peer for benchmarks and fault tests: rounds of swarm's all-reduce on a synthetic tensor.

Each round every peer contributes a tensor that is a known function of (its index, the round), so the
exact average is known; it records what it got to a JSON-lines file, one line per round:
round, codec, group size, seconds, bytes sent/received by our own accounting and by the kernel's
interface counters, parts dropped, a hash of the result, wall-clock start and end, and the CPU
seconds this peer's processes (the peer, its DHT process, ``p2pd``) spent during the all-reduce.
Before each all-reduce it writes ``{"state": "allreduce", ...}`` to ``--status``, and then the number
of parts it has fetched in that round (``parts_fetched``), so a fault injector knows when to strike.

    python -m harness.averaging_peer --index 0 --listen 127.0.0.1 --out p0.jsonl --status p0.json
    python -m harness.averaging_peer --index 1 --initial-peers /ip4/.../p2p/... --out p1.jsonl ...

``--compression none,fp16`` runs ``--rounds`` rounds with each codec in turn (round numbers go on),
after ``--warmup`` rounds (connections are set up in the first one) that are marked as such.
``--trace`` also records, per round, when each fetch of the all-reduce started and ended (reduce-
scatter inputs ``in``, all-gather outputs ``out``, ``commit``), to see where the time goes.

``--attack`` plays a hostile member (it still runs the honest reducer for its own part): ``scale1000``
sends its update x1000, ``signflip`` x-4, ``noise100`` Gaussian noise of 100 times its norm, ``weight``
its ordinary update with weight 1000 (the others declare 1); several, separated by commas, take turns
round by round (round r plays the (r mod count)-th). ``--shared S`` makes the peers' updates
similar, as gradients of one model are: S times a direction all share, plus each one's own noise.
``--no-robust`` turns robust aggregation off (``averaging.robust: null``).
``--equivocate`` plays a reducer that returns different results to different members (harness/hostile.py);
``--garbage`` plays a reducer that returns everyone the same noise at 100x its true result's norm;
``--no-accountability`` turns off the defences (reducers' signed receipts, compared in the commit, their signed
result norms held to the members' signed input norms, and the exclusion of a reducer caught);
``--trust-unproven-outliers`` takes outlier evidence without the accused's own signed claim over its group (what
``harness/evidence_forger.py`` needs to frame a peer). ``--pause`` waits that many seconds between rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.utils.logging import use_hivemind_log_handler

from harness.hostile import make_hostile
from harness.netlab import Lab, interface_bytes, process_tree_cpu, process_tree_peak_memory, wait_for_file
from swarm.averaging.averager import Averager
from swarm.averaging.group import RoundMissed
from swarm.compression.plan import CompressionPlan
from swarm.compression.registry import wire_codecs
from swarm.config.schema import AveragingConfig, NetworkConfig
from swarm.net.bound_evidence import BoundEvidence
from swarm.net.dht import shutdown_dht, start_dht, visible_maddrs
from swarm.net.exclusion_record import Evidence
from swarm.net.identity import load_identity
from swarm.net.outlier_evidence import RoundProof
from swarm.train.rounds import RoundTracker

ATTACKS = ("scale1000", "signflip", "noise100", "weight")
ATTACK_WEIGHT = 1000.0  # what ``--attack weight`` declares; honest peers declare 1


def contribution(index: int, round_number: int, numel: int, shared: float = 0.0) -> torch.Tensor:
    """Peer ``index``'s update in a round: its own N(0, 1) noise, plus ``shared`` x a direction shared by all."""
    generator = torch.Generator().manual_seed(1000 * round_number + index)
    own = torch.randn(numel, generator=generator)
    if shared:
        own += shared * torch.randn(numel, generator=torch.Generator().manual_seed(10**9 + round_number))
    return own


def attacked(attack: str | None, update: torch.Tensor, round_number: int) -> tuple[torch.Tensor, float]:
    """What a member playing ``attack`` sends instead of ``update``, and the weight it declares."""
    if attack == "scale1000":
        return update * 1000, 1.0
    if attack == "signflip":
        return update * -4, 1.0
    if attack == "noise100":
        noise = torch.randn(update.shape, generator=torch.Generator().manual_seed(2 * 10**9 + round_number))
        return noise * (100 * update.norm() / update.numel() ** 0.5), 1.0
    if attack == "weight":
        return update, ATTACK_WEIGHT
    return update, 1.0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--megabytes", type=float, default=16.0, help="size of the fp32 tensor (MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per codec")
    parser.add_argument("--warmup", type=int, default=0,
                        help="rounds before the counted ones (first codec; records marked warmup)")
    parser.add_argument("--expect", type=int, default=1, help="wait for this many peers before round 0")
    parser.add_argument("--compression", default="none", help="codec name, or several separated by commas")
    parser.add_argument("--chunk-timeout", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=1.0)
    parser.add_argument("--round-timeout", type=float, default=60.0)
    parser.add_argument("--trace", action="store_true", help="record the start and end of every fetch")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True)
    parser.add_argument("--address-file", type=Path)
    parser.add_argument("--dump", type=Path, help="save each round's result here as round<r>.pt")
    parser.add_argument("--nan-at-round", type=int, default=-1, help="contribute NaN in this round (a broken peer)")
    parser.add_argument("--snoop", action="store_true",
                        help="after each round, also ask the other members for slices of their updates meant for "
                             "another reducer (a curious member); counts what it got in the record")
    parser.add_argument("--no-fetch-check", action="store_true",
                        help="serve parts to anyone who asks (the defence against --snoop turned off)")
    parser.add_argument("--rogue", action="store_true",
                        help="skip this peer's own NaN check, as a hostile or buggy peer would, so NaN goes out")
    parser.add_argument("--attack", type=_attacks, default=[],
                        help=f"send a hostile update or weight, one of {', '.join(ATTACKS)}, or several in turn "
                             f"(comma-separated)")
    parser.add_argument("--shared", type=float, default=0.0,
                        help="weight of a direction all peers' updates share (0: independent updates)")
    parser.add_argument("--no-robust", action="store_true", help="averaging.robust: null (the plain weighted mean)")
    # issue 11, "no veto, no stall": hostile members (harness/hostile.py) and the veto's defence turned off
    parser.add_argument("--veto", action="store_true", help="report every part missing in this peer's commit")
    parser.add_argument("--stall", action="store_true",
                        help="answer fetches of this peer's inputs and reduced part with heartbeats only, never data")
    parser.add_argument("--drop-reported", action="store_true",
                        help="drop every part any member reports missing (the defence against --veto turned off)")
    parser.add_argument("--equivocate", action="store_true",
                        help="as a reducer, return a different (validly signed) result to half the members")
    parser.add_argument("--garbage", action="store_true",
                        help="as a reducer, serve everyone noise at 100x the true result's norm, validly signed")
    parser.add_argument("--no-direct", action="store_true",
                        help="round parts over libp2p only (averaging.direct: false), not over direct links")
    parser.add_argument("--no-accountability", action="store_true",
                        help="neither sign nor check reduced parts (the defence against --equivocate turned off)")
    parser.add_argument("--trust-unproven-outliers", action="store_true",
                        help="take outlier evidence without the accused's own claim over its group (the defence "
                             "against harness/evidence_forger.py turned off: the rule before)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    return parser.parse_args()


def _attacks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attack {', '.join(unknown) or text!r}; known: {', '.join(ATTACKS)}")
    return names


def start_in_lab(lab: Lab, work: Path, hosts: list[int], args: list[str], *, python: str = sys.executable) -> dict:
    """Start ``harness.averaging_peer`` on each host (the first one is everyone's initial peer); returns
    host -> Popen. Files: ``work/p<host>.jsonl`` (records), ``work/s<host>.json`` (status)."""
    procs = {}
    first = hosts[0]
    address = work / "address.json"

    def command(host: int, extra: list[str]) -> list[str]:
        return [python, "-m", "harness.averaging_peer", "--index", str(host), "--listen", lab.ip(host),
                "--out", str(work / f"p{host}.jsonl"), "--status", str(work / f"s{host}.json"), *extra, *args]

    procs[first] = lab.popen(first, command(first, ["--address-file", str(address)]), log=work / f"p{first}.log")
    started = wait_for_file(address, procs[first], 90)
    if started is None:
        raise RuntimeError(f"the first averaging peer did not start; see {work / f'p{first}.log'}")
    maddr = next(m for m in started["maddrs"] if f"/{lab.ip(first)}/" in m)
    for host in hosts[1:]:
        procs[host] = lab.popen(host, command(host, ["--initial-peers", maddr]), log=work / f"p{host}.log")
    return procs


def main() -> None:
    args = _parse_args()
    use_hivemind_log_handler("nowhere")
    logging.basicConfig(level=os.environ.get("SWARM_LOGLEVEL", "INFO").upper(),
                        format=f"%(asctime)s %(levelname)-7s [averager{args.index}] %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    torch.set_num_threads(1)
    codecs = [name.strip() for name in args.compression.split(",") if name.strip()]
    plans = {name: CompressionPlan(codec=name) for name in codecs}
    identity = load_identity(None)
    dht = start_dht(NetworkConfig(listen_host=args.listen, initial_peers=args.initial_peers, bootstrap_timeout=30),
                    identity=identity)
    if args.address_file:
        args.address_file.write_text(json.dumps({"maddrs": visible_maddrs(dht)}))
    averaging = AveragingConfig(compression=codecs[0], chunk_timeout=args.chunk_timeout,
                                request_timeout=args.request_timeout, averaging_timeout=args.round_timeout,
                                **({"robust": None} if args.no_robust else {}))
    fetches = Fetches(args.status)
    # a rogue plays a peer running other code: it sends whatever it has, NaN included
    averager = Averager(dht=dht, run_id="bench", averaging=averaging, check_own_input=not args.rogue,
                        check_fetchers=not args.no_fetch_check,
                        accepted_codecs=frozenset().union(*(wire_codecs(name) for name in codecs)),
                        fetch_observer=fetches.observe,
                        drop_reported=args.drop_reported,
                        private_key=None if args.no_accountability else identity.private_key,
                        direct_host=None if args.no_direct else args.listen)
    make_hostile(averager.service, veto=args.veto, stall=args.stall, equivocate=args.equivocate,
                 garbage=args.garbage)
    if args.trust_unproven_outliers:
        RoundProof.claim_problem = lambda self, accused: None
    tracker = RoundTracker(dht=dht, run_id="bench", refresh_period=0.5).start()
    numel = int(args.megabytes * (1 << 20) / 4)
    try:
        for plan in plans.values():  # pay for imports (bitsandbytes: seconds) before the timed rounds
            codec = plan.choose_codec(torch.zeros(numel))
            deserialize_torch_tensor(codec.compress(torch.ones(65536), CompressionInfo.from_tensor(torch.ones(65536))))
        tracker.report(0, 0)
        deadline = time.monotonic() + 120
        while len(tracker.expected(0)) < args.expect and time.monotonic() < deadline and not stop.is_set():
            stop.wait(0.2)
        for round_number in range(args.warmup + args.rounds * len(codecs)):
            if stop.is_set():
                break
            codec = codecs[max(0, round_number - args.warmup) // args.rounds]
            tracker.report(round_number, 1)
            record = _round(args, averager, plans[codec], tracker, round_number, numel, fetches)
            _append(args.out, {"codec": codec, **record})
            stop.wait(args.pause)
        fetches.set_status({"state": "done", "time": time.time()})
    finally:
        tracker.shutdown()
        averager.shutdown()
        shutdown_dht(dht)
    os._exit(0)


def _round(args, averager: Averager, plan: CompressionPlan, tracker: RoundTracker, round_number: int,
           numel: int, fetches: "Fetches") -> dict:
    """One round: matchmaking, then the all-reduce through ``plan``; returns its JSON record."""
    attack = args.attack[round_number % len(args.attack)] if args.attack else None
    mine, weight = attacked(attack, contribution(args.index, round_number, numel, args.shared), round_number)
    if round_number == args.nan_at_round:
        mine[::7] = float("nan")
    fetches.set_status({"state": "matchmaking", "round": round_number, "time": time.time()})
    record = {"round": round_number, "index": args.index, "me": _index_of(averager.service.peer_id), "attack": attack}
    if round_number < args.warmup:
        record["warmup"] = True
    matchmaking_started = time.perf_counter()
    try:
        group = averager.form_group(round_number, weight=weight, expected=lambda: tracker.expected(round_number))
    except (RoundMissed, TimeoutError) as e:
        return {**record, "ok": False, "error": str(e), "ended_at": time.time()}
    record["matchmaking_seconds"] = time.perf_counter() - matchmaking_started
    fetches.set_status({"state": "allreduce", "round": round_number, "time": time.time(), "group_size": group.size,
                        "parts_fetched": 0})
    wire_before, cpu_before = interface_bytes(), process_tree_cpu()
    started_at, started = time.time(), time.perf_counter()
    try:
        averaged = averager.reduce(group, [mine], weight=weight, plan=plan)[0]
    except Exception as e:  # recorded: the benchmark counts failed rounds
        return {**record, "ok": False, "group_size": group.size, "error": repr(e),
                "seconds": time.perf_counter() - started, "started_at": started_at, "ended_at": time.time()}
    seconds, ended_at = time.perf_counter() - started, time.time()
    wire_after, cpu_after = interface_bytes(), process_tree_cpu()
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        torch.save(averaged, args.dump / f"round{round_number}.pt")
    result = averager.last_result
    record.update(
        ok=True, group_size=group.size, seconds=seconds, started_at=started_at, ended_at=ended_at,
        finite=bool(torch.isfinite(averaged).all()),
        hash=hashlib.sha256(averaged.numpy().tobytes()).hexdigest()[:16],
        bytes_sent=result.bytes_sent if result else 0, bytes_received=result.bytes_received if result else 0,
        wire_sent=wire_after[0] - wire_before[0], wire_received=wire_after[1] - wire_before[1],
        cpu={name: round(cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0), 3) for name in cpu_after},
        peak_mib={name: round(mib, 1) for name, mib in process_tree_peak_memory().items()},  # since the peer started
        missing_parts=result.missing_parts if result else [], members=[_index_of(peer) for peer in group.members],
        numel=numel, fetch_paths=dict(averager.service.fetches),  # since the peer started: "direct", "libp2p"
        # robust aggregation of this peer's part: member (as in "members") -> share kept, or weight counted
        clipped={_index_of(group.members[i]): kept for i, kept in (result.clipped if result else {}).items()},
        capped_weights={_index_of(group.members[i]): w for i, w in (result.capped_weights if result else {}).items()},
        farthest=result.farthest if result else 0.0,
        repaired_parts=result.repaired_parts if result else [],
        gone=[_index_of(group.members[index]) for index in result.gone] if result else [],
        # reducers this peer caught equivocating, or returning a result out of bounds, in this round, and every
        # peer it excludes after it
        equivocators=sorted({item.accused[-6:] for item in result.evidence if isinstance(item, Evidence)})
        if result else [],
        oversized=sorted({item.accused[-6:] for item in result.evidence if isinstance(item, BoundEvidence)})
        if result else [],
        norm=float(averaged.norm()),
        excluded=sorted(peer[-6:] for peer in averager.exclusions.excluded()) if averager.exclusions else [],
    )
    if args.snoop:
        record.update(_snoop(averager, group, numel))
    if args.trace:
        record["fetches"] = [{**item, "peer": _index_of(item["peer"]), "start": item["start"] - started,
                              "end": item["end"] - started} for item in fetches.log]
    return record


def _snoop(averager: Averager, group, numel: int) -> dict:
    """Ask every other member for the slices of its update that other reducers fetch (``in``, j for
    j not this peer's index): a member curious about another member's individual update."""
    got = refused = 0
    service = averager.service
    for index, peer in group.others():
        for j in range(group.size):
            if j in (group.my_index, index):
                continue
            try:  # what a modified client can call: the service's own fetch, with any key it likes
                _, payloads = service._call(service._fetch(peer, (group.group_id, 0, "in", j), 8 * numel + 4096),
                                            averager.averaging.chunk_timeout * 2)
                got += bool(payloads)
            except Exception:
                refused += 1
    return {"snooped": got, "snoop_refused": refused}


class Fetches:
    """This round's fetches (for ``--trace``) and the status file, whose ``parts_fetched`` counts them."""

    def __init__(self, status_path: Path):
        self.status_path, self.status, self.log = status_path, {}, []

    def set_status(self, status: dict) -> None:
        self.status, self.log = status, []
        self.status_path.write_text(json.dumps(status))

    def observe(self, entry: dict) -> None:  # on the averaging service's loop
        self.log.append(entry)
        if "bytes" in entry and "parts_fetched" in self.status:
            self.status["parts_fetched"] += 1
            self.status_path.write_text(json.dumps(self.status))


def _index_of(peer) -> str:
    return peer.to_base58()[-6:]


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()


if __name__ == "__main__":
    main()
