"""Robust aggregation's price without attackers: all-reduce round time and DiLoCo held-out loss, on vs off.

    sudo .venv/bin/python -m benchmarks.robust_overhead [--trials 3] [--rounds 4] [--rate 100mbit] [--loss]

1. The reducer alone: CPU time of CenteredClip and of the plain weighted mean on 4 inputs of 1M values
   (one part of a 16 MiB tensor in a group of 4), without an outlier and with one input x1000.
2. Round time: 4 averaging peers (``harness/averaging_peer.py``), each in a network namespace on a
   bridge, 16 MiB of fp32 (``--codec``, default none), ``averaging.robust`` on (the default) and off
   (``--no-robust``) in alternating trials, each a fresh swarm with one warm-up round then ``--rounds``
   rounds. Links are uncapped by default: the all-reduce is then CPU-bound, the worst case for the
   reducer's extra work; ``--rate 100mbit`` caps them as ``allreduce_links.py`` does. A round's time is
   the slowest peer's all-reduce (group formed to result); reported: median per setting and the ratio.
3. ``--loss``: the debug model in DiLoCo (``benchmarks/training.py``'s "diloco H=10 8-bit": 3 trainers,
   blockwise 8-bit with error feedback), robust on and off, ``--loss-trials`` each, alternating: held-out
   loss of every trainer at the end, and how far the farthest input came from the others (in robust
   scales, ``Counters.peak_distance_ratio``: 2 and beyond is clipped) and how many inputs were clipped.
Needs root for 2 and 3 (skipped with a message without it); prints tables and writes
``benchmarks/results/robust_overhead.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.report import environment, markdown_table, median, span, write_json
from harness.averaging_peer import start_in_lab
from harness.netlab import Lab, available, load_average, read_records, wait_all

PEERS, MEGABYTES = 4, 16.0


def reducer_cpu(reps: int) -> list[list]:
    """CPU milliseconds per aggregation of 4 x 1M values, one thread (the reducer runs in one executor thread)."""
    import torch

    from swarm.averaging.robust import CenteredClip, WeightedMean

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    honest = [torch.randn(1 << 20, generator=generator) for _ in range(PEERS)]
    attacked = honest[:-1] + [honest[-1] * 1000]
    rows = []
    for name, inputs in (("no outlier", honest), ("one input x1000", attacked)):
        row = [name]
        for aggregator in (WeightedMean(), CenteredClip()):
            aggregator.aggregate(inputs, [1.0] * PEERS)
            started = time.process_time()
            for _ in range(reps):
                result = aggregator.aggregate(inputs, [1.0] * PEERS)
            row.append(1000 * (time.process_time() - started) / reps)
        rows.append(row + [row[2] / row[1], getattr(result, "iterations", 0)])
    return rows


def run_trial(robust: bool, args, work: Path) -> list[dict]:
    link = dict(rate=args.rate, burst="64kb", latency="50ms") if args.rate else dict(rate=None)
    with Lab(PEERS, **link) as lab:
        procs = start_in_lab(lab, work, list(range(PEERS)), [
            "--rounds", str(args.rounds), "--warmup", "1", "--expect", str(PEERS), "--megabytes", str(MEGABYTES),
            "--compression", args.codec, *([] if robust else ["--no-robust"])])
        if not wait_all(list(procs.values()), args.timeout):
            print(f"  trial robust={robust}: peers still running after {args.timeout:.0f}s, killed", file=sys.stderr)
    return [record for host in range(PEERS) for record in read_records(work / f"p{host}.jsonl")]


def round_times(records: list[dict]) -> tuple[list[float], int, int]:
    """Per counted round: the slowest peer's seconds; and the rounds left out (failed, partial, disagreeing),
    and inputs clipped (none are expected: no one attacks)."""
    by_round: dict[int, list[dict]] = {}
    for record in records:
        by_round.setdefault(record["round"], []).append(record)
    times, bad, clipped = [], 0, 0
    for _, members in sorted(by_round.items()):
        if members[0].get("warmup"):
            continue
        good = [m for m in members if m.get("ok") and m.get("group_size") == PEERS]
        if len(good) < PEERS or len({m["hash"] for m in good}) != 1:
            bad += 1
            continue
        times.append(max(m["seconds"] for m in good))
        clipped += sum(len(m.get("clipped", {})) for m in good)
    return times, bad, clipped


def run_loss(trials: int, samples: int, root: Path, timeout: float) -> dict[str, list[dict]]:
    from benchmarks.training import CONFIGS, run_swarm

    _, options = CONFIGS["diloco H=10 8-bit"]
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for trial in range(trials):
        for setting in ("on", "off"):
            work = root / f"loss-{setting}-{trial}"
            work.mkdir(parents=True)
            t0 = time.monotonic()
            result = run_swarm({**options, "robust": setting == "on"}, samples, work, timeout)
            result["seconds"] = time.monotonic() - t0
            runs[setting].append(result)
            print(f"  DiLoCo robust {setting}, trial {trial}: losses {result.get('losses')} in "
                  f"{result['seconds']:.0f}s", file=sys.stderr, flush=True)
    return runs


def loss_rows(runs: dict[str, list[dict]]) -> list[list]:
    rows = []
    for setting, results in runs.items():
        losses = [loss for r in results for loss in r.get("losses", []) if loss is not None]
        counters = [c for r in results for c in r.get("averaging", [])]
        rows.append([setting, len(results), span(losses, 4), median(losses),
                     max((c.get("peak_distance_ratio", 0.0) for c in counters), default=None),
                     sum(c.get("clipped_inputs", 0) for c in counters),
                     sum(c.get("rounds_ok", 0) for c in counters)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="swarms per setting for the round time (0: skip it)")
    parser.add_argument("--rounds", type=int, default=4, help="counted rounds per trial")
    parser.add_argument("--codec", default="none")
    parser.add_argument("--rate", default=None, help="cap every link, e.g. 100mbit (default: uncapped)")
    parser.add_argument("--reps", type=int, default=10, help="repetitions of the reducer-alone measurement")
    parser.add_argument("--loss", action="store_true", help="also train the debug model with robust on and off")
    parser.add_argument("--loss-trials", type=int, default=1)
    parser.add_argument("--samples", type=int, default=4800, help="samples per training run (--loss)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--quick", action="store_true", help="2 trials of 3 rounds, 5 repetitions")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.rounds, args.reps = 2, 3, 5
    started, env = time.monotonic(), environment()
    data: dict = dict(environment=env, args={k: str(v) for k, v in vars(args).items()})

    cpu = reducer_cpu(args.reps)
    data["reducer_ms"] = cpu
    print("The reducer alone: CPU ms per part, 4 inputs of 1M fp32 values, one thread\n")
    print(markdown_table(["inputs", "plain mean", "CenteredClip", "ratio", "CenteredClip steps"], cpu))

    reason = available()
    if reason:
        print(f"\nround time and loss skipped: {reason}")
        write_json("robust_overhead.json", data, args.out)
        return 0
    times: dict[str, list[float]] = {"on": [], "off": []}
    bad = {"on": 0, "off": 0}
    clipped = {"on": 0, "off": 0}
    loads = []
    with TemporaryDirectory(prefix="swb-robust-") as tmp:
        for trial in range(args.trials):
            for setting in (("on", "off") if trial % 2 == 0 else ("off", "on")):
                work = Path(tmp) / f"{setting}-{trial}"
                work.mkdir()
                loads.append(load_average()[0])
                measured, failed, clips = round_times(run_trial(setting == "on", args, work))
                times[setting] += measured
                bad[setting] += failed
                clipped[setting] += clips
                print(f"  trial {trial} robust {setting}: {span(measured)} s (load {loads[-1]:.1f})",
                      file=sys.stderr, flush=True)
        data.update(round_seconds=times, failed_rounds=bad, clipped_inputs=clipped, loads=loads)
        on, off = median(times["on"]), median(times["off"])
        ratio = on / off if on and off else None
        data["ratio"] = ratio
        if loads:
            print(f"\nRound time, {PEERS} peers, {MEGABYTES:g} MiB {args.codec}, links "
                  f"{args.rate or 'uncapped'}, {args.trials} trials x {args.rounds} rounds per setting, alternating; "
                  f"load average {min(loads):.1f}-{max(loads):.1f} on {env['cpus']} CPUs\n")
            print(markdown_table(["robust", "rounds", "seconds: median (min-max)", "mean", "inputs clipped"],
                                 [[s, f"{len(times[s])}" + (f" (+{bad[s]} failed)" if bad[s] else ""), span(times[s]),
                                   statistics.mean(times[s]) if times[s] else None, clipped[s]] for s in ("on", "off")]))
        if ratio is not None:
            print(f"\nrobust on ÷ off, median round time: {ratio:.3f} (goal ≤ 1.10: {'met' if ratio <= 1.10 else 'missed'})")
        if args.loss:
            runs = run_loss(args.loss_trials, args.samples, Path(tmp), args.timeout)
            data["loss"] = runs
            rows = loss_rows(runs)
            print(f"\nDiLoCo H=10, blockwise8, 3 trainers, {args.samples} samples: held-out loss at the end\n")
            print(markdown_table(["robust", "runs", "held-out loss: median (min-max)", "median",
                                  "farthest input (robust scales)", "inputs clipped", "rounds ok (all trainers)"], rows))
            medians = {row[0]: row[3] for row in rows}
            if medians.get("on") and medians.get("off"):
                change = medians["on"] / medians["off"] - 1
                data["loss_change"] = change
                print(f"\nheld-out loss, robust on vs off: {change:+.2%} (goal within 1%: "
                      f"{'met' if abs(change) <= 0.01 else 'missed'})")
    path = write_json("robust_overhead.json", data, args.out)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
