"""Run every benchmark in turn and keep their tables in one report.

    sudo .venv/bin/python -m benchmarks.run_all [--quick] [--only codecs,allreduce,training,kill,admission,robust,nat,hostile,scaling,overlap,traffic,control]
    make bench            # the same (BENCH_ARGS=--quick for the short version)

1. ``codecs.py``: compression ratio, error and speed of every codec next to hivemind's (no root needed);
2. ``allreduce_links.py``: all-reduce of 16 MiB over 100 Mbit/s namespace links, N = 2 and 4, per codec,
   next to torch.distributed (gloo);
3. ``training.py``: the debug model trained to the same samples in one process, the swarm in sync and
   DiLoCo modes, and DDP: held-out loss and bytes per sample;
4. ``kill_scenario.py``: one of three peers killed (or cut off) mid all-reduce, repeated, next to
   hivemind's figures from BASELINES.md;
5. ``admission_cost.py``: what a private run's admission costs (DHT authorizer per request; join time,
   round time, bytes and CPU per round of a private run next to the same run open);
6. ``robust_overhead.py``: robust aggregation's price without attackers (the reducer's CPU time, the
   all-reduce's round time on vs off; ``python -m benchmarks.robust_overhead --loss`` adds held-out loss).
7. ``nat_relay.py``: two trainers at home behind NAT, through the relay, next to the same two on public
   addresses: join time, round time, bytes per round and through the relay.
8. ``hostile_training.py``: a hostile DiLoCo trainer among four (x1000, sign flip, noise, weight, stale,
   every part missing, heartbeats only, a garbage or an equivocating reducer), robust aggregation on and
   off, held-out loss of the honest trainers next to a clean run (127.0.0.1, no root; about 3 minutes per
   arm; make bench runs two of them).
9. ``scaling.py``: cost against the number of peers (2, 3, 4) and the model's size (0.87M and 10.9M
   parameters): step time and memory, all-reduce time, bytes, CPU and peak memory; a fitted model
   extrapolated to 100 peers and 1B parameters (docs/scaling.md; about 12 minutes, ``--quick`` too).
10. ``overlap.py``: DiLoCo at H=50 with ``diloco.overlap`` off and on, links capped at 100 and 10 Mbit/s:
   compute utilization (fraction of training wall time in local steps), held-out loss on ÷ off at equal
   samples, wall time (about 8 minutes, load 6-8; ``--quick``: 2 rounds per arm).
11. ``traffic.py``: bytes per sample of DiLoCo by H x codec (blockwise8, sparse) against sync, the control
    traffic (DHT records, heartbeats) apart from the averaging payload, held-out loss vs sync (issue 14 goal 2;
    about 15 minutes, ``--quick`` 8).
12. ``control_traffic.py``: the control traffic of an idle DiLoCo swarm (no averaging in the window) with its
    sources switched off one at a time: progress reports every second, every 10 s, rejoin pings off.
Benchmarks 2-7 and 9-12 need root (network namespaces) and are skipped with a message without it. Each writes
its JSON under ``benchmarks/results/``; this runner also writes ``benchmarks/results/report.md`` with
every table. Measured here: 13-17 minutes on 2 shared cores (``--quick``: about 6-7), plus 3-7 minutes
for the admission benchmark and about 4 (``--quick``: 2) for the robust one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # name -> (script, arguments for --quick)
    "codecs": ("codecs", ["--reps", "3"]),
    "allreduce": ("allreduce_links", ["--quick"]),
    "training": ("training", ["--quick"]),
    "kill": ("kill_scenario", ["--quick"]),
    "admission": ("admission_cost", ["--quick", "--repeats", "1"]),
    "robust": ("robust_overhead", ["--quick"]),
    "nat": ("nat_relay", ["--quick"]),
    "hostile": ("hostile_training", ["--rounds", "4", "--attacks", "scale1000,signflip"]),
    "scaling": ("scaling", ["--quick"]),
    "overlap": ("overlap", ["--rounds", "2"]),
    "traffic": ("traffic", ["--quick"]),
    "control": ("control_traffic", ["--window", "20"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, samples and trials")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="which benchmarks, comma-separated")
    parser.add_argument("--report", type=Path, default=HERE / "results" / "report.md")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    sections, failures = [], []
    started = time.monotonic()
    for name in chosen:
        script, quick = BENCHMARKS[name]
        command = [sys.executable, "-m", f"benchmarks.{script}", *(quick if args.quick else [])]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        t0 = time.monotonic()
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)  # stderr (progress) goes through
        print(result.stdout, flush=True)
        seconds = time.monotonic() - t0
        if result.returncode != 0:
            failures.append(name)
        sections.append(f"## {name} ({seconds / 60:.1f} min{', FAILED' if result.returncode else ''})\n\n"
                        f"`{' '.join(['python', *command[1:]])}`\n\n{result.stdout.strip()}\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(f"# Benchmarks{' (quick)' if args.quick else ''}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                           + "\n".join(sections))
    print(f"all done in {(time.monotonic() - started) / 60:.1f} min; tables in {args.report}"
          + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
