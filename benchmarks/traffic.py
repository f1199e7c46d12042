"""Traffic benchmark: bytes per sample of DiLoCo by H x codec against uncompressed sync, with the control
traffic (DHT records, heartbeats, headers) apart from the averaging payload, and held-out loss vs sync.

    sudo .venv/bin/python -m benchmarks.traffic [--samples 9600] [--quick] [--configs ...]

Every configuration is a real swarm of ``benchmarks/training.py`` (its ``run_swarm``: a bootstrap peer and
3 trainers of ``configs/debug.yaml``, each in a network namespace; bytes are the kernel's counters of every
host's interface; metrics records off, the bootstrap peer's included). Configurations:
- ``sync``: ``averaging.mode=sync``, uncompressed: the baseline, run first, in the same program;
- ``H=50 blockwise8`` and ``H=100 blockwise8``: DiLoCo with 8-bit pseudo-gradients (what issue 14 started from);
- ``H=50 sparse`` and ``H=100 sparse``: DiLoCo with ``averaging.compression=sparse`` (1 % of each part's values,
  4 bits, error feedback; :mod:`swarm.compression.sparse`);
- ``sparse 10%``: the same with ``averaging.sparse_fraction=0.1`` (H = 50, 100 and 200).
Every DiLoCo configuration reports its progress as the defaults say (every ``diloco.idle_refresh_period`` = 10 s
until a round is about to close, then every second), but ``+ reports 1 s`` (``diloco.idle_refresh_period=null``,
the default until 2026-12-03): what the idle period saves. The bootstrap peer's metrics records are off too.
Columns: bytes per sample over the whole run (start-up and the first round's state downloads included)
and in steady state (from every trainer past round 0 to every trainer at the last round), sync's ÷ this,
DiLoCo's own count of averaging payload in the steady window, the rest (control traffic) in KB/s and as a
share of the steady bytes, and held-out loss ÷ sync's at equal samples. Writes ``benchmarks/results/traffic.json``.
With ``--census`` every peer runs under ``harness/dht_census.py``, and each configuration also prints the DHT
requests all nodes served per round, by kind and key (the progress tracker, matchmaking's ready records...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Optional

from benchmarks import training
from benchmarks.report import environment, markdown_table, median, write_json
from harness.netlab import available, load_average

EVERY_SECOND = ["diloco.idle_refresh_period=null"]  # progress reports every second (the default until 2026-12-03)
CONFIGS = {  # name -> options of training.run_swarm
    "sync": dict(mode="sync", compression="none"),
    "H=50 blockwise8 + reports 1 s": dict(mode="diloco", compression="blockwise8", inner_steps=50, sets=EVERY_SECOND),
    "H=50 blockwise8": dict(mode="diloco", compression="blockwise8", inner_steps=50),
    "H=50 sparse": dict(mode="diloco", compression="sparse", inner_steps=50),
    "H=100 blockwise8": dict(mode="diloco", compression="blockwise8", inner_steps=100),
    "H=100 sparse": dict(mode="diloco", compression="sparse", inner_steps=100),
    # denser: 10 % kept reached sync's held-out loss at H=50 in 4 rounds (1 % and 3 % did not)
    "H=50 sparse 10%": dict(mode="diloco", compression="sparse", inner_steps=50, sets=["averaging.sparse_fraction=0.1"]),
    "H=100 sparse 10%": dict(mode="diloco", compression="sparse", inner_steps=100, sets=["averaging.sparse_fraction=0.1"]),
    "H=200 sparse 10%": dict(mode="diloco", compression="sparse", inner_steps=200, sets=["averaging.sparse_fraction=0.1"]),
}
GOAL = 1000  # issue 14: at least this many times fewer bytes per sample than sync...
LOSS_GOAL = 1.02  # ... at a held-out loss at most this many times sync's


def row(name: str, r: dict, results: dict[str, dict]) -> tuple[list, Optional[dict]]:
    if "error" in r:
        return [name] + ["-"] * 9 + [r["error"]], None
    sync = results.get("sync", {})
    whole, steady = training.per_sample(r, False), training.per_sample(r, True)
    sync_whole = training.per_sample(sync, False) if "samples" in sync else None
    sync_steady = training.per_sample(sync, True) if "samples" in sync else None
    reference = training.sync_loss_at(results, r["samples"])
    loss = median(r["losses"])
    window = r.get("steady") or {}
    payload = window.get("payload") or None
    control = window["bytes"] - payload if payload else None
    figures = dict(
        whole=whole, steady=steady, vs_sync_whole=sync_whole / whole if sync_whole and whole else None,
        vs_sync_steady=sync_steady / steady if sync_steady and steady else None,
        payload_per_sample=payload / window["samples"] if payload else None,
        control_kb_s=control / window["seconds"] / 1e3 if control is not None else None,
        control_share=control / window["bytes"] if control is not None else None,
        loss=loss, loss_vs_sync=loss / reference if reference else None)

    def fmt(value, pattern):
        return pattern.format(value) if value is not None else "-"

    cells = [name, r["samples"], f"{loss:.4f}", fmt(figures["loss_vs_sync"], "{:.3f}"), fmt(whole, "{:.0f}"),
             fmt(steady, "{:.0f}"), f"{fmt(figures['vs_sync_whole'], '{:.0f}x')} / {fmt(figures['vs_sync_steady'], '{:.0f}x')}",
             fmt(figures["payload_per_sample"], "{:.1f}"), fmt(figures["control_kb_s"], "{:.1f}"),
             fmt(figures["control_share"] and 100 * figures["control_share"], "{:.0f} %"),
             "" if r.get("finished", True) else "did not finish in time"]
    return cells, figures


def verdicts(figures: dict[str, dict]) -> list[str]:
    lines = []
    for name, f in figures.items():
        if name == "sync" or f is None:
            continue
        factor = f["vs_sync_steady"] or f["vs_sync_whole"]
        loss_ok = f["loss_vs_sync"] is not None and f["loss_vs_sync"] <= LOSS_GOAL
        met = factor is not None and factor >= GOAL and loss_ok
        lines.append(f"{name}: {factor or 0:.0f}x fewer bytes/sample than sync (steady state, or whole run), held-out "
                     f"loss {f['loss_vs_sync'] or float('nan'):.3f}x sync's: goal ≥ {GOAL}x at ≤ {LOSS_GOAL}x "
                     f"{'met' if met else 'missed'}; control traffic {100 * (f['control_share'] or 0):.0f} % of the "
                     f"steady bytes (goal < 10 %: {'met' if (f['control_share'] or 1) < 0.1 else 'missed'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=9600, help="samples per configuration, all trainers together")
    parser.add_argument("--quick", action="store_true", help="4800 samples (H=100: one round, no steady state)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one configuration may take")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/traffic.json)")
    parser.add_argument("--census", action="store_true", help="also count the DHT requests every node serves, by key, "
                        "per round (harness/dht_census.py)")
    parser.add_argument("--keep", type=Path, help="keep logs and status files in this folder")
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    samples = 4800 if args.quick else args.samples
    env, started, loads, results = environment(), time.monotonic(), [], {}
    with TemporaryDirectory(prefix="swb-traffic-") as tmp:
        root = args.keep or Path(tmp)
        for name in [n.strip() for n in args.configs.split(",") if n.strip()]:
            work = root / name.replace(" ", "_").replace("=", "").replace("+", "")
            work.mkdir(parents=True, exist_ok=True)
            loads.append(load_average()[0])
            t0 = time.monotonic()
            results[name] = {**training.run_swarm({**CONFIGS[name], "census": args.census}, samples, work, args.timeout),
                             "seconds": time.monotonic() - t0}
            print(f"ran {name} in {time.monotonic() - t0:.0f}s (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    print(f"{samples} samples per configuration (debug model, 0.87M parameters, batch 16, {training.TRAINERS} trainers, "
          f"metrics records off); load average {min(loads):.1f}-{max(loads):.1f} on {env['cpus']} CPUs\n")
    rows, figures = [], {}
    for name, r in results.items():
        cells, figures[name] = row(name, r, results)
        rows.append(cells)
    print(markdown_table(["config", "samples", "held-out loss", "÷ sync", "bytes / sample", "steady bytes / sample",
                          "sync ÷ this (whole / steady)", "steady payload B / sample", "steady control KB/s",
                          "control share", "note"], rows))
    lines = verdicts(figures)
    for name, r in results.items():
        rounds = max(r.get("epochs") or [0])
        if r.get("census") and rounds:
            print(f"\nDHT requests served in {name!r} by all nodes, per round over the whole run ({rounds} rounds; "
                  "protobuf bytes, without libp2p's framing):")
            print(markdown_table(["request, key", "requests", "request KB", "response KB"],
                                 [[key, f"{c[0] / rounds:.1f}", f"{c[1] / rounds / 1e3:.1f}", f"{c[2] / rounds / 1e3:.1f}"]
                                  for key, c in sorted(r["census"].items(), key=lambda kv: -(kv[1][1] + kv[1][2]))]))
    print()
    for line in lines:
        print(line)
    path = write_json("traffic.json", dict(environment=env, samples=samples, loads=loads, results=results,
                                           figures=figures, verdicts=lines, seconds=time.monotonic() - started), args.out)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
