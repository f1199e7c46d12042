"""All-reduce benchmark over emulated links: swarm's all-reduce per codec next to torch.distributed (gloo).

    sudo .venv/bin/python -m benchmarks.allreduce_links [--sizes 2,4] [--rounds 4] [--quick]

N peers (``--sizes``), each in its own network namespace on a bridge, every link capped at 100 Mbit/s
in both directions (``tbf rate 100mbit burst 64kb latency 50ms``, see ``harness/netlab.py``), all-reduce
M = 16 MiB of fp32 (4M values). Per codec, swarm's peers (``harness/averaging_peer.py``: a DHT, a p2pd
daemon and the averaging service each, matchmaking before every round) run ``--rounds`` rounds, once
with round parts over direct links (``swarm``, the default: :mod:`swarm.net.direct`) and once over libp2p
alone (``swarm-libp2p``: ``averaging.direct: false``, every byte through p2pd); ``--impls`` adds
``swarm-bare`` (no robust aggregation, no signed receipts or norm claims: without the key those sign
with there are no direct links either, so it goes over libp2p and compares with ``swarm-libp2p``),
which shows what the defences cost a round; then gloo ranks (``gloo_peer.py``) run the same
number of ``all_reduce`` calls in fp32 and fp16 over the same links. Reported per configuration
(medians over rounds; one warm-up swarm round before them, which also sets up connections, is left out):

- time of a round (the slowest peer's all-reduce, from group formed to result) ÷ the bandwidth bound
  2(N-1)/N · M / B with B = 100 Mbit/s and M the uncompressed 16 MiB, and ÷ gloo's fp32 time;
- bytes each peer sent on the wire (the kernel's counters of its interface, read by the peer around
  the all-reduce alone) ÷ 2(N-1)/N · M_c, M_c the codec's payload for the whole tensor;
- CPU seconds per round of each peer's processes (the peer, its DHT helper process, p2pd), and where
  a round's wall time went (``--trace`` of the averaging peer: preparation, reduce-scatter, reduce,
  all-gather, commit).
Needs root (namespaces); prints a markdown table and writes ``benchmarks/results/allreduce_links.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.report import environment, markdown_table, median, span, write_json
from harness.averaging_peer import start_in_lab
from harness.netlab import Lab, available, load_average, read_records, wait_all

NUMEL = 4 * 2**20  # 16 MiB of fp32
RATE_BITS = 100e6
LINK = dict(rate="100mbit", burst="64kb", latency="50ms")
GLOO_DTYPE = {"none": "float32", "fp16": "float16"}
# the averaging peer's options per arm (swarm's defaults: direct links, CenteredClip, accountability);
# swarm-bare has no identity key, hence no direct links: compare it with swarm-libp2p
ARMS = {"swarm": (), "swarm-libp2p": ("--no-direct",), "swarm-bare": ("--no-robust", "--no-accountability")}
# /work/shared/BASELINES.md, measured earlier on this kind of machine (not in this run): time ÷ bound
EARLIER = {
    (2, "hivemind", "none"): "1.16-1.24", (2, "hivemind", "fp16"): "1.09-1.23", (2, "hivemind", "blockwise8"): "1.14-1.56 (uint8)",
    (4, "hivemind", "none"): "1.18-1.27", (4, "hivemind", "fp16"): "1.24-1.54", (4, "hivemind", "blockwise8"): "1.46-2.4 (uint8)",
    (2, "gloo", "none"): "1.07-1.12", (4, "gloo", "none"): "1.06-1.10",
}


def bound_seconds(n: int, nbytes: float) -> float:
    return 2 * (n - 1) / n * nbytes * 8 / RATE_BITS


def payload_bytes(codec: str) -> int:
    """Bytes of the whole tensor encoded with ``codec`` (what the bound of that codec counts)."""
    import torch
    from hivemind.compression import CompressionInfo

    from swarm.compression.registry import make_codec

    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    return len(make_codec(codec).compress(x, CompressionInfo.from_tensor(x)).buffer)


def run_swarm(n: int, codecs: list[str], rounds: int, work: Path, timeout: float, numel: int = NUMEL,
              extra: tuple[str, ...] = ()) -> list[dict]:
    with Lab(n, **LINK) as lab:
        procs = start_in_lab(lab, work, list(range(n)), [
            "--rounds", str(rounds), "--warmup", "1", "--expect", str(n), "--compression", ",".join(codecs), "--trace",
            "--megabytes", str(numel * 4 / 2**20), *extra])
        finished = wait_all(list(procs.values()), timeout)
    records = [record for host in range(n) for record in read_records(work / f"p{host}.jsonl")]
    if not finished:
        print(f"  swarm N={n}: peers still running after {timeout:.0f}s, killed", file=sys.stderr)
    return records


def run_gloo(n: int, dtypes: list[str], rounds: int, work: Path, timeout: float) -> list[dict]:
    with Lab(n, **LINK) as lab:
        procs = [lab.popen(rank, [sys.executable, "-m", "benchmarks.gloo_peer", "--rank", str(rank), "--world", str(n),
                                  "--master", lab.ip(0), "--rounds", str(rounds), "--dtypes", ",".join(dtypes),
                                  "--out", str(work / f"g{rank}.jsonl")],
                           log=work / f"g{rank}.log", env={"GLOO_SOCKET_IFNAME": "eth0"}) for rank in range(n)]
        finished = wait_all(procs, timeout)
    if not finished:
        print(f"  gloo N={n}: ranks still running after {timeout:.0f}s, killed", file=sys.stderr)
    return [record for rank in range(n) for record in read_records(work / f"g{rank}.jsonl")]


def phases(record: dict) -> dict:
    """Where one peer's all-reduce spent its wall time, from its fetch trace."""
    fetches = record.get("fetches") or []
    inputs = [f for f in fetches if f["kind"] == "in"]
    outputs = [f for f in fetches if f["kind"] == "out"]
    if not inputs or not outputs:
        return {}
    in_start, in_end = min(f["start"] for f in inputs), max(f["end"] for f in inputs)
    out_start, out_end = min(f["start"] for f in outputs), max(f["end"] for f in outputs)
    return {"prepare": in_start, "reduce_scatter": in_end - in_start, "reduce": out_start - in_end,
            "all_gather": out_end - out_start, "commit": record["seconds"] - out_end}


def summarize_swarm(n: int, records: list[dict], payloads: dict[str, int], numel: int = NUMEL,
                    impl: str = "swarm") -> list[dict]:
    """Per codec: the rounds every one of the ``n`` peers finished with one identical finite result;
    ``payloads``: bytes of the whole ``numel``-value tensor per codec (what the bounds count)."""
    by_round = defaultdict(list)
    for record in records:
        by_round[record["round"]].append(record)
    rows = []
    for codec in dict.fromkeys(record["codec"] for record in records):
        times, wire, own, cpu, breakdown, bad = [], [], [], defaultdict(list), defaultdict(list), 0
        peak = defaultdict(list)
        matchmaking = []
        counted = 0
        for number, members in sorted(by_round.items()):
            if members[0]["codec"] != codec or members[0].get("warmup"):
                continue
            good = [m for m in members if m.get("ok") and m.get("group_size") == n]
            if len(good) < n or len({m["hash"] for m in good}) != 1 or not all(m["finite"] for m in good):
                bad += 1
                continue
            counted += 1
            times.append(max(m["seconds"] for m in good))
            matchmaking.append(min(m.get("matchmaking_seconds", 0.0) for m in good))  # the last to arrive
            wire += [m["wire_sent"] for m in good]
            own += [m["bytes_sent"] for m in good]
            for m in good:
                for name, seconds in m["cpu"].items():
                    cpu[name].append(seconds)
                for name, mib in m.get("peak_mib", {}).items():
                    peak[name].append(mib)
            slowest = max(good, key=lambda m: m["seconds"])
            for name, seconds in phases(slowest).items():
                breakdown[name].append(seconds)
        payload_bound = 2 * (n - 1) / n * payloads[codec]
        rows.append(dict(
            n=n, impl=impl, codec=codec, rounds=counted, failed_rounds=bad, seconds=times,
            numel=numel, time_vs_bound=[t / bound_seconds(n, numel * 4) for t in times], wire_sent=wire,
            wire_vs_bound=[w / payload_bound for w in wire], own_vs_bound=median(o / payload_bound for o in own),
            cpu={name: median(values) for name, values in cpu.items()},
            peak_mib={name: max(values) for name, values in peak.items()},
            phases={name: median(values) for name, values in breakdown.items()}, matchmaking=matchmaking,
            fetch_paths=_paths(records),
        ))
    return rows


def _paths(records: list[dict]) -> dict[str, int]:
    """Round parts fetched over each path, all peers, the whole run (each peer's last record has its totals)."""
    last: dict[int, dict] = {}
    for record in records:
        if record.get("fetch_paths") is not None:
            last[record["index"]] = record["fetch_paths"]
    return {path: sum(paths.get(path, 0) for paths in last.values()) for path in ("direct", "libp2p")}


def summarize_gloo(n: int, records: list[dict], payloads: dict[str, int]) -> list[dict]:
    rows = []
    for dtype in dict.fromkeys(record["dtype"] for record in records):
        mine = [r for r in records if r["dtype"] == dtype]
        by_round = defaultdict(list)
        for record in mine:
            by_round[record["round"]].append(record)
        times = [max(r["seconds"] for r in members) for members in by_round.values() if len(members) == n]
        codec = "none" if dtype == "float32" else "fp16"
        payload_bound = 2 * (n - 1) / n * payloads[codec]
        rows.append(dict(
            n=n, impl="gloo", codec=codec, rounds=len(times), failed_rounds=len(by_round) - len(times), seconds=times,
            time_vs_bound=[t / bound_seconds(n, NUMEL * 4) for t in times],
            wire_vs_bound=[r["wire_sent"] / payload_bound for r in mine], own_vs_bound=None,
            cpu={"peer": median(r["cpu"]["peer"] for r in mine)}, phases={},
        ))
    return rows


def print_tables(rows: list[dict]) -> None:
    gloo = {(row["n"], row["codec"]): median(row["seconds"]) for row in rows if row["impl"] == "gloo"}
    table = []
    for row in rows:
        reference = gloo.get((row["n"], "none"))
        vs_gloo = [t / reference for t in row["seconds"]] if reference else []
        cpu = row["cpu"]
        swarm = row["impl"] != "gloo"
        paths = row.get("fetch_paths") or {}
        table.append([
            row["n"], row["impl"], row["codec"] if swarm else ("fp32" if row["codec"] == "none" else "fp16"),
            f"{row['rounds']}" + (f" (+{row['failed_rounds']} failed)" if row["failed_rounds"] else ""),
            span(row["seconds"]), span(row["time_vs_bound"]), span(vs_gloo) if swarm else "-",
            span(row["wire_vs_bound"], 3),
            " / ".join(f"{cpu.get(name, 0) or 0:.2f}" for name in ("peer", "p2pd", "helpers")) if swarm
            else f"{cpu.get('peer') or 0:.2f}",
            f"{paths.get('direct', 0)} / {paths.get('libp2p', 0)}" if swarm else "-",
            EARLIER.get((row["n"], "hivemind" if swarm else "gloo", row["codec"]), "-"),
        ])
    print(markdown_table(
        ["N", "impl", "codec", "rounds", "seconds", "time ÷ bound (16 MiB)", "time ÷ gloo fp32",
         "wire bytes sent per peer ÷ 2(N-1)/N·(codec's payload)",
         "CPU s/round (peer / p2pd / dht)", "fetches direct / libp2p", "earlier: hivemind or gloo ÷ bound"], table))
    print("\nWhere a swarm round's wall time went (seconds, median over rounds, the slowest peer):")
    names = ["prepare", "reduce_scatter", "reduce", "all_gather", "commit"]
    print(markdown_table(["N", "impl", "codec", *names, "total", "matchmaking before it, last peer to arrive (not in total)"],
                         [[row["n"], row["impl"], row["codec"], *(row["phases"].get(name) for name in names),
                           median(row["seconds"]), median(row["matchmaking"])] for row in rows if row["impl"] != "gloo"]))


def targets(rows: list[dict]) -> list[str]:
    lines = []
    gloo = {(row["n"], row["codec"]): median(row["seconds"]) for row in rows if row["impl"] == "gloo"}
    for row in rows:
        if row["impl"] == "gloo" or row["codec"] != "none" or not row["seconds"]:
            continue
        wire, time_ratio = median(row["wire_vs_bound"]), median(row["time_vs_bound"])
        vs_gloo = median(row["seconds"]) / gloo[(row["n"], "none")] if (row["n"], "none") in gloo else None
        checks = [("bytes ≤ 1.05× bound", wire, 1.05), ("time ≤ 1.3× bound", time_ratio, 1.3),
                  ("time ≤ 1.2× gloo", vs_gloo, 1.2)]
        lines.append(f"N={row['n']} uncompressed, {row['impl']}: " + "; ".join(
            f"{name}: {value:.2f} ({'met' if value <= limit else 'missed'})" if value is not None else f"{name}: n/a"
            for name, value, limit in checks))
    return lines


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4", help="numbers of peers, comma-separated")
    parser.add_argument("--codecs", default="none,fp16,blockwise8")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per codec (swarm) and per dtype (gloo)")
    parser.add_argument("--quick", action="store_true", help="2 rounds per codec")
    parser.add_argument("--impls", default="gloo,swarm,swarm-libp2p",
                        help=f"what to run at each size, comma-separated: gloo and any of {', '.join(ARMS)}")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one set of peers to finish")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/allreduce_links.json)")
    parser.add_argument("--keep", type=Path, help="keep the peers' logs and records in this folder")
    parser.add_argument("--rate", default=LINK["rate"],
                        help="tbf rate of the links; 'none' leaves them uncapped, to see the software's own ceiling "
                             "(ratios still use the 100 Mbit/s bound)")
    parser.add_argument("--egress-only", action="store_true",
                        help="cap only what each host sends (diagnostic: no second bottleneck toward the receiver)")
    args = parser.parse_args(argv)
    args.impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    unknown = [impl for impl in args.impls if impl != "gloo" and impl not in ARMS]
    if unknown:
        parser.error(f"unknown --impls {', '.join(unknown)} (known: gloo, {', '.join(ARMS)})")
    return args


def _measure(sizes: list[int], impls: list[str], codecs: list[str], rounds: int, root: Path, timeout: float,
             payloads: dict) -> tuple[list[dict], list[float]]:
    """``impls`` in turn at each size; returns (table rows, load averages seen)."""
    rows, loads = [], []
    for n in sizes:
        for impl in impls:
            work = root / f"{impl}{n}"
            work.mkdir(parents=True, exist_ok=True)
            loads.append(load_average()[0])
            t0 = time.monotonic()
            if impl == "gloo":
                rows += summarize_gloo(n, run_gloo(n, ["float32", "float16"], rounds, work, timeout), payloads)
            else:
                rows += summarize_swarm(n, run_swarm(n, codecs, rounds, work, timeout, extra=ARMS[impl]), payloads,
                                        impl=impl)
            print(f"measured {impl} N={n} in {time.monotonic() - t0:.0f}s (load {loads[-1]:.1f})",
                  file=sys.stderr, flush=True)
    return rows, loads


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    LINK["rate"] = None if args.rate == "none" else args.rate
    if args.egress_only:
        LINK["egress_only"] = True
    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    rounds = 2 if args.quick else args.rounds
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    env = environment()
    payloads = {codec: payload_bytes(codec) for codec in dict.fromkeys(codecs + ["none", "fp16"])}
    started = time.monotonic()
    with TemporaryDirectory(prefix="swb-allreduce-") as tmp:
        rows, loads = _measure([int(s) for s in args.sizes.split(",")], args.impls, codecs, rounds, args.keep or Path(tmp),
                               args.timeout, payloads)
    print(markdown_table(["setting", "value"], [
        ["links", f"tbf rate {LINK['rate']} burst {LINK['burst']} latency {LINK['latency']}, "
                  f"{'egress only' if LINK.get('egress_only') else 'both directions'}"
         if LINK["rate"] else "uncapped veth (bound and ratios still for 100 Mbit/s)"],
        ["M", f"{NUMEL * 4 / 2**20:.0f} MiB fp32"], ["bound (N=2, N=4)", ", ".join(
            f"{bound_seconds(n, NUMEL * 4):.2f} s" for n in (2, 4))],
        ["load average during the run", f"{min(loads):.1f}-{max(loads):.1f} on {env['cpus']} CPUs"]]))
    print()
    print_tables(rows)
    print()
    for line in targets(rows):
        print(line)
    path = write_json("allreduce_links.json", dict(
        environment=env, link=LINK, numel=NUMEL, rounds=rounds, payload_bytes=payloads, loads=loads,
        seconds=time.monotonic() - started, rows=rows, targets=targets(rows)), args.out)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
