"""One averaging peer for benchmarks and fault tests: rounds of swarm's all-reduce on a synthetic tensor.

Each round every peer contributes a tensor that is a known function of (its index, the round), so the
exact average is known; it records what it got to a JSON-lines file, one line per round:
round, codec, group size, seconds, bytes sent/received by our own accounting and by the kernel's
interface counters, parts dropped, a hash of the result, wall-clock start and end, and the CPU
seconds this peer's processes (the peer, its DHT process, ``p2pd``) spent during the all-reduce.
Before each all-reduce it writes ``{"state": "allreduce", ...}`` to ``--status`` so a fault injector
knows when to strike.

    python benchmarks/allreduce_peer.py --index 0 --listen 127.0.0.1 --out p0.jsonl --status p0.json
    python benchmarks/allreduce_peer.py --index 1 --initial-peers /ip4/.../p2p/... --out p1.jsonl ...

``--compression none,fp16`` runs ``--rounds`` rounds with each codec in turn (round numbers go on),
after ``--warmup`` rounds (connections are set up in the first one) that are marked as such.
``--trace`` also records, per round, when each fetch of the all-reduce started and ended (reduce-
scatter inputs ``in``, all-gather outputs ``out``, ``commit``), to see where the time goes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.netlab import interface_bytes, process_tree_cpu  # noqa: E402
from peers.lifecycle import set_log_peer, setup_logging  # noqa: E402
from swarm.averaging.group import RoundMissed  # noqa: E402
from swarm.averaging.service import AveragingService  # noqa: E402
from swarm.compression.plan import CompressionPlan  # noqa: E402
from swarm.config.schema import AveragingConfig, NetworkConfig  # noqa: E402
from swarm.net.dht import shutdown_dht, start_dht, visible_maddrs  # noqa: E402
from swarm.train.rounds import RoundTracker  # noqa: E402


def contribution(index: int, round_number: int, numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * round_number + index)
    return torch.randn(numel, generator=generator)


def main() -> None:
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
    parser.add_argument("--rogue", action="store_true",
                        help="skip this peer's own NaN check, as a hostile or buggy peer would, so NaN goes out")
    args = parser.parse_args()
    if args.rogue:  # this process plays a peer running different code: it sends whatever it has
        import swarm.averaging.allreduce as allreduce_module

        allreduce_module._decode = lambda payload, numel: deserialize_torch_tensor(payload).reshape(-1).float()

    setup_logging(f"averager{args.index}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    torch.set_num_threads(1)
    network = NetworkConfig(listen_host=args.listen, initial_peers=args.initial_peers, bootstrap_timeout=30)
    codecs = [name.strip() for name in args.compression.split(",") if name.strip()]
    plans = {name: CompressionPlan(AveragingConfig(compression=name)) for name in codecs}
    dht = start_dht(network)
    set_log_peer(f"averager{args.index}", str(dht.peer_id))
    if args.address_file:
        args.address_file.write_text(json.dumps({"maddrs": visible_maddrs(dht)}))
    service = AveragingService(dht=dht, run_id="bench", chunk_timeout=args.chunk_timeout,
                               request_timeout=args.request_timeout).start()
    fetches: list[dict] = []
    if args.trace:
        _trace_fetches(service, fetches)
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
            mine = contribution(args.index, round_number, numel)
            if round_number == args.nan_at_round:
                mine[::7] = float("nan")
            status = {"state": "matchmaking", "round": round_number, "time": time.time()}
            args.status.write_text(json.dumps(status))
            record = {"round": round_number, "index": args.index, "me": _index_of(dht.peer_id), "codec": codec}
            if round_number < args.warmup:
                record["warmup"] = True
            matchmaking_started = time.perf_counter()
            try:
                group = service.form_group(round_number, weight=1.0, expected=lambda: tracker.expected(round_number),
                                           timeout=args.round_timeout)
            except RoundMissed as e:
                record.update(ok=False, error=str(e), ended_at=time.time())
                _append(args.out, record)
                continue
            record["matchmaking_seconds"] = time.perf_counter() - matchmaking_started
            args.status.write_text(json.dumps({"state": "allreduce", "round": round_number, "time": time.time(),
                                               "group_size": group.size}))
            fetches.clear()
            wire_before, cpu_before = interface_bytes(), process_tree_cpu()
            started_at, started = time.time(), time.perf_counter()
            outcome: dict = {}

            def allreduce(tensors, phase, choose_codec):
                result = service.allreduce(group, tensors, weight=1.0, phase=phase, choose_codec=choose_codec,
                                           timeout=args.round_timeout)
                outcome.update(missing=result.missing_parts, sent=result.bytes_sent, received=result.bytes_received,
                               contributors=result.contributors)
                return result.tensors, result.sent

            try:
                averaged = plans[codec].average([mine], allreduce)[0]
            except Exception as e:  # recorded: the benchmark counts failed rounds
                record.update(ok=False, group_size=group.size, error=repr(e), seconds=time.perf_counter() - started,
                              started_at=started_at, ended_at=time.time())
                _append(args.out, record)
                continue
            finally:
                service.finish_group(group)
            seconds, ended_at = time.perf_counter() - started, time.time()
            wire_after, cpu_after = interface_bytes(), process_tree_cpu()
            members = [_index_of(peer) for peer in group.members]
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                torch.save(averaged, args.dump / f"round{round_number}.pt")
            record.update(
                ok=True, group_size=group.size, seconds=seconds, started_at=started_at, ended_at=ended_at,
                finite=bool(torch.isfinite(averaged).all()),
                hash=hashlib.sha256(averaged.numpy().tobytes()).hexdigest()[:16],
                bytes_sent=outcome.get("sent", 0), bytes_received=outcome.get("received", 0),
                wire_sent=wire_after[0] - wire_before[0], wire_received=wire_after[1] - wire_before[1],
                cpu={name: round(cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0), 3) for name in cpu_after},
                missing_parts=outcome.get("missing", []), members=members, numel=numel,
            )
            if args.trace:
                record["fetches"] = [{**item, "start": item["start"] - started, "end": item["end"] - started}
                                     for item in fetches]
            _append(args.out, record)
        args.status.write_text(json.dumps({"state": "done", "time": time.time()}))
    finally:
        tracker.shutdown()
        service.shutdown()
        shutdown_dht(dht)
    os._exit(0)


def _trace_fetches(service: AveragingService, log: list[dict]) -> None:
    """Wrap the service's fetch (what the all-reduce calls to pull a part from a peer) with timestamps."""
    fetch = service._fetch

    async def traced(peer, key, max_bytes):
        start = time.perf_counter()
        entry = {"kind": key[2], "index": key[3], "peer": _index_of(peer), "start": start}
        try:
            header, payloads = await fetch(peer, key, max_bytes)
            entry["bytes"] = sum(len(p.buffer) for p in payloads)
            return header, payloads
        except Exception as e:
            entry["error"] = type(e).__name__
            raise
        finally:
            entry["end"] = time.perf_counter()
            log.append(entry)

    service._fetch = traced


def _index_of(peer) -> str:
    return peer.to_base58()[-6:]


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()


if __name__ == "__main__":
    main()
