"""One torch.distributed (gloo) rank doing all_reduce rounds on a tensor: the baseline of the all-reduce
benchmark, run in the same namespaces over the same links as swarm's peers.

    GLOO_SOCKET_IFNAME=eth0 python -m benchmarks.gloo_peer --rank 0 --world 2 --master 10.1.0.1 --out r0.jsonl

Each round: a barrier, then one ``all_reduce`` (sum) of ``--megabytes`` of fp32, timed; the kernel's
interface byte counters are read around the all_reduce alone. ``--dtypes float32,float16`` runs
``--rounds`` rounds of each in turn. One JSON line per round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from harness.netlab import interface_bytes, process_tree_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True, help="rank 0's address")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--megabytes", type=float, default=16.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="float32", help="float32, float16 or both (comma-separated): rounds of each")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=120))
    numel = int(args.megabytes * (1 << 20) / 4)
    dtypes = [name.strip() for name in args.dtypes.split(",")]
    try:
        for round_number in range(args.rounds * len(dtypes)):
            dtype_name = dtypes[round_number // args.rounds]
            dtype = getattr(torch, dtype_name)
            tensor = torch.randn(numel, generator=torch.Generator().manual_seed(1000 * round_number + args.rank))
            tensor = tensor.to(dtype)
            dist.barrier()
            wire_before, cpu_before = interface_bytes(), process_tree_cpu()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            seconds = time.perf_counter() - started
            wire_after, cpu_after = interface_bytes(), process_tree_cpu()
            record = {
                "round": round_number, "rank": args.rank, "world": args.world, "dtype": dtype_name, "seconds": seconds,
                "wire_sent": wire_after[0] - wire_before[0], "wire_received": wire_after[1] - wire_before[1],
                "cpu": {"peer": round(cpu_after["peer"] - cpu_before["peer"], 3)},
                "finite": bool(torch.isfinite(tensor).all()),
                "hash": hashlib.sha256(tensor.float().numpy().tobytes()).hexdigest()[:16],
            }
            with open(args.out, "a") as file:
                file.write(json.dumps(record) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
