"""Overlapped DiLoCo rounds (``diloco.overlap``): compute utilization and held-out loss, overlap off vs on.

    sudo .venv/bin/python -m benchmarks.overlap [--rounds 4] [--rates 100mbit,10mbit] [--inner-steps 50]

The debug model (``configs/debug.yaml``: ~0.87M parameters, batch 16) in DiLoCo with H = 50 inner steps and
blockwise 8-bit pseudo-gradients, 3 trainers and a bootstrap peer, each in a network namespace whose link
is capped at each ``--rates`` (both directions, ``harness/netlab.py``); the same number of rounds (so the
same round budget of samples) with ``diloco.overlap`` off and on, the arms of one rate run back to back.
Each arm is ``benchmarks/training.py``'s swarm run (the real CLI).

Reported per arm: utilization (each trainer's ``TrainingStatus.utilization``: the fraction of its
training's wall time spent computing local steps, see :mod:`swarm.train.loop`), the same with the
held-out evaluations at every round left out of the wall time (the benchmark's own measurement, not a
cost of averaging), the seconds each trainer's steps spent on communication (averaging, waiting for it,
state checks), the final held-out loss (every trainer ends on the same model) and its ratio on ÷ off,
samples trained and wall time. The targets (issue 14): utilization ≥ 95% at 100 Mbit/s with overlap,
held-out loss within 1% of the run without it at equal samples. Loss differs between any two runs (each
trainer's batches are drawn from a stream seeded by its random peer id), so a ratio within the spread
of repeated runs (``--trials``) says no more than "no visible difference".
Needs root; prints a table and writes ``benchmarks/results/overlap.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Optional

from benchmarks import training
from benchmarks.report import environment, markdown_table, median, span, write_json
from harness.netlab import available, load_average

UTILIZATION_TARGET, LOSS_TOLERANCE = 0.95, 0.01


def run_arm(rate: str, overlap: bool, args, work: Path) -> dict:
    options = dict(mode="diloco", compression="blockwise8", inner_steps=args.inner_steps, rate=rate,
                   sets=[f"diloco.overlap={str(overlap).lower()}"])
    samples = args.rounds * args.inner_steps * training.BATCH * training.TRAINERS
    load = load_average()[0]
    started = time.monotonic()
    result = training.run_swarm(options, samples, work, args.timeout)
    return {**result, "rate": rate, "overlap": overlap, "seconds": time.monotonic() - started, "load": load}


def excluding_evaluation(split: dict) -> Optional[float]:
    wall = split.get("wall", 0) - split.get("evaluation", 0)
    return split["steps"] / wall if split and wall > 0 else None


def summarize(run: dict) -> dict:
    if "error" in run:
        return run
    splits = run.get("time_split", [])
    return {
        "utilization": [u for u in run.get("utilization", []) if u is not None],
        "utilization_no_eval": [u for u in map(excluding_evaluation, splits) if u is not None],
        "communication": [split.get("communication") for split in splits if split],
        "loss": median(run["losses"]),
        "rounds_failed": sum(a.get("rounds_failed", 0) for a in run.get("averaging", [])),
    }


def print_table(runs: list[dict]) -> list[str]:
    rows, lines = [], []
    off = {run["rate"]: run for run in runs if not run["overlap"] and "error" not in run}
    for run in runs:
        name = [run["rate"], "on" if run["overlap"] else "off"]
        if "error" in run:
            rows.append(name + ["-"] * 8 + [run["error"]])
            continue
        s, base = run["summary"], off.get(run["rate"])
        ratio = s["loss"] / base["summary"]["loss"] if base is not None and run["overlap"] else None
        rows.append(name + [
            span(s["utilization"], 3), span(s["utilization_no_eval"], 3), span(s["communication"], 1),
            f"{s['loss']:.4f}", f"{ratio:.4f}" if ratio else "1 (reference)" if not run["overlap"] else "-",
            run["samples"], f"{run['seconds']:.0f}", f"{run['load']:.1f}",
            "" if run.get("finished") else "did not finish in time"])
        if run["overlap"]:
            utilization = median(s["utilization"])
            met_u = utilization is not None and utilization >= UTILIZATION_TARGET
            verdict = f"utilization {utilization:.3f} (target ≥ {UTILIZATION_TARGET}: {'met' if met_u else 'missed'}"
            no_eval = median(s["utilization_no_eval"])
            verdict += f"; {no_eval:.3f} with the held-out evaluations left out)" if no_eval is not None else ")"
            if ratio is not None:
                verdict += (f"; held-out loss {ratio:.4f}x the run without overlap "
                            f"({'met' if abs(ratio - 1) <= LOSS_TOLERANCE else 'missed'}: target within 1%)")
            lines.append(f"{run['rate']}, overlap on: {verdict}")
    print(markdown_table(["link", "overlap", "utilization", "… without evaluations", "communication s / trainer",
                          "held-out loss", "loss on ÷ off", "samples", "wall s", "load", "note"], rows))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="DiLoCo rounds per arm")
    parser.add_argument("--inner-steps", type=int, default=50, help="H")
    parser.add_argument("--rates", default="100mbit,10mbit", help="link caps, comma-separated (netlab/tc syntax)")
    parser.add_argument("--trials", type=int, default=1, help="runs of each arm (off and on alternate)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one arm may take")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/overlap.json)")
    parser.add_argument("--keep", type=Path, help="keep logs and status files in this folder")
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    env, started, runs = environment(), time.monotonic(), []
    with TemporaryDirectory(prefix="swb-overlap-") as tmp:
        root = args.keep or Path(tmp)
        for rate in [r.strip() for r in args.rates.split(",") if r.strip()]:
            for trial in range(args.trials):
                for overlap in (False, True):
                    work = root / f"{rate}-{'on' if overlap else 'off'}-{trial}"
                    work.mkdir(parents=True, exist_ok=True)
                    run = run_arm(rate, overlap, args, work)
                    run["summary"] = summarize(run)
                    runs.append(run)
                    print(f"{rate} overlap {'on' if overlap else 'off'}: {run['seconds']:.0f} s (load {run['load']:.1f})",
                          file=sys.stderr, flush=True)
    merged = merge_trials(runs)
    loads = [run["load"] for run in runs]
    print(f"DiLoCo H={args.inner_steps}, {args.rounds} rounds per arm, {training.TRAINERS} trainers, debug model, "
          f"blockwise 8-bit; {args.trials} trial(s) per arm; load average {min(loads):.1f}-{max(loads):.1f} "
          f"on {env['cpus']} CPUs\n")
    lines = print_table(merged)
    print()
    for line in lines:
        print(line)
    path = write_json("overlap.json", dict(environment=env, rounds=args.rounds, inner_steps=args.inner_steps,
                                           runs=runs, targets=lines, seconds=time.monotonic() - started), args.out)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s)")
    return 0


def merge_trials(runs: list[dict]) -> list[dict]:
    """One row per (rate, overlap): the trials' trainers pooled, loss and seconds the trials' median; a
    failed trial's error instead if any failed."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["rate"], run["overlap"]), []).append(run)
    merged = []
    for trials in groups.values():
        failed = [run for run in trials if "error" in run]
        if failed:
            merged.append(failed[0])
            continue
        summary = {field: [value for run in trials for value in run["summary"][field]]
                   for field in ("utilization", "utilization_no_eval", "communication")}
        summary["loss"] = statistics.median(run["summary"]["loss"] for run in trials)
        merged.append({**trials[0], "summary": summary, "seconds": statistics.median(run["seconds"] for run in trials),
                       "finished": all(run.get("finished") for run in trials)})
    return merged


if __name__ == "__main__":
    sys.exit(main())
