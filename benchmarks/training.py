"""Training benchmark: the debug model to the same number of samples, trained seven ways; held-out loss and
bytes sent per sample.

    sudo .venv/bin/python -m benchmarks.training [--samples 4800] [--quick]

Configurations (``configs/debug.yaml``: ~0.87M parameters, batch 16, swarm epoch = 192 samples):
- ``local b192``: one process, each step the average of 12 clipped batches of 16 (the swarm's
  192-sample epoch in ``sync`` mode, without a network), warm-up as configured;
- ``local b16``: one process, a plain loop, one AdamW step per batch of 16 (what a DiLoCo inner step is);
- ``sync``: the swarm in ``averaging.mode=sync`` (hivemind.Optimizer), uncompressed;
- ``diloco H=10``, ``H=50`` and ``H=100``: ``averaging.mode=diloco`` with ``diloco.inner_steps`` = H and
  ``averaging.compression=blockwise8`` (H=100 is one round of 4800 samples: where bytes per sample
  cross 100x below sync's at this model size, since a round's payload is fixed and its samples grow with H);
- ``ddp``: torch DistributedDataParallel over gloo, 3 ranks x 4 batches of 16 = 192 per step.
Swarm configurations run the real CLI (``python -m peers bootstrap`` and 3 x ``python -m peers join``,
with ``metrics=null``: the signed metrics records every peer publishes for the monitor are DHT traffic of
their own, the same in every mode; ``--metrics`` keeps them);
they and the DDP ranks each run in a network namespace of their own on a bridge (links not capped:
only bytes matter here), so the bytes are the kernel's counters of every host's interface, bootstrap
included, summed over the whole run (start-up, DHT traffic, state downloads: everything sent).
Bytes per sample = that total ÷ the samples all trainers processed. DiLoCo's own counter of
averaging payload is shown next to it. The local references (``benchmarks/reference_trainer.py``) use
the library's model, data, initial weights, held-out set and optimizer.
Needs root; prints a table and writes ``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Optional

from benchmarks.report import environment, markdown_table, median, write_json
from benchmarks.swarm_ticks import Sampler, loss_at, loss_curve, window
from harness.dht_census import census_command, read_census
from harness.netlab import Lab, available, kill_group, load_average, wait_all, wait_for_file

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "debug.yaml"
TRAINERS = 3
KEEP_METRICS = False  # --metrics: keep the config's metrics records (monitoring traffic, the same in every mode)
BATCH, EPOCH_SAMPLES = 16, 192  # configs/debug.yaml: training.batch_size, training.target_batch_size
CONFIGS = {  # name -> (kind, options)
    "local b192": ("local", dict(accum=12, warmup=True)),
    "local b16": ("local", dict(accum=1, warmup=False)),
    "ddp b192": ("ddp", dict(accum=4, warmup=True)),
    "sync": ("swarm", dict(mode="sync", compression="none")),
    "diloco H=10 8-bit": ("swarm", dict(mode="diloco", compression="blockwise8", inner_steps=10)),
    "diloco H=50 8-bit": ("swarm", dict(mode="diloco", compression="blockwise8", inner_steps=50)),
    "diloco H=100 8-bit": ("swarm", dict(mode="diloco", compression="blockwise8", inner_steps=100)),
    "diloco H=50 sparse": ("swarm", dict(mode="diloco", compression="sparse", inner_steps=50)),
    "diloco H=100 sparse": ("swarm", dict(mode="diloco", compression="sparse", inner_steps=100)),
}


def run_local(options: dict, samples: int, work: Path, timeout: float) -> dict:
    out = work / "result.json"
    command = [sys.executable, "-m", "benchmarks.reference_trainer", "--config", str(CONFIG), "--samples", str(samples),
               "--accum", str(options["accum"]), "--out", str(out)] + (["--warmup"] if options["warmup"] else [])
    with open(work / "log.txt", "wb") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False, cwd=HERE.parent)
    if not out.exists():
        return dict(error=f"no result; see {work / 'log.txt'}")
    result = json.loads(out.read_text())
    return dict(samples=result["samples"], losses=[result["heldout_loss"]], bytes_total=0)


def run_ddp(options: dict, samples: int, work: Path, timeout: float) -> dict:
    out, status = work / "result.json", work / "status.json"
    steps = math.ceil(samples / (BATCH * options["accum"] * TRAINERS))
    with Lab(TRAINERS, rate=None) as lab:
        sampler = Sampler(lab, list(range(TRAINERS)), [status])
        sampler.start()
        procs = [lab.popen(rank, [
            sys.executable, "-m", "benchmarks.reference_trainer", "--config", str(CONFIG), "--samples", str(samples),
            "--accum", str(options["accum"]), "--world", str(TRAINERS), "--rank", str(rank), "--master", lab.ip(0),
            "--out", str(out), "--status", str(status)] + (["--warmup"] if options["warmup"] else []),
            log=work / f"rank{rank}.log", env={"GLOO_SOCKET_IFNAME": "eth0"}) for rank in range(TRAINERS)]
        finished = wait_all(procs, timeout)
        ticks = sampler.finish()
    if not out.exists():
        return dict(error="ranks did not finish" if not finished else f"no result; see {work}")
    result = json.loads(out.read_text())
    return dict(samples=result["samples"], losses=[result["heldout_loss"]], bytes_total=ticks[-1]["sent"],
                steady=window(ticks, "step", steps))


def run_swarm(options: dict, samples: int, work: Path, timeout: float) -> dict:
    """One swarm run: ``options`` gives ``mode``, ``compression`` and (DiLoCo) ``inner_steps``; optional:
    ``robust`` (False: averaging.robust=null), ``rate`` (netlab link cap, e.g. "10mbit"; default uncapped),
    ``sets`` (more ``--set`` items for every trainer), ``census`` (True: every peer runs under
    :mod:`harness.dht_census`, and the result's ``census`` is what all DHT nodes served over the run, by key)."""
    if options["mode"] == "sync":
        epochs = math.ceil(samples / EPOCH_SAMPLES)
        sets = ["averaging.mode=sync", f"averaging.compression={options['compression']}"]
    else:
        epochs = math.ceil(samples / (options["inner_steps"] * BATCH * TRAINERS))
        sets = ["averaging.mode=diloco", f"averaging.compression={options['compression']}",
                f"diloco.inner_steps={options['inner_steps']}"]
    sets += [f"training.max_epochs={epochs}", "checkpoint=null"] + ([] if KEEP_METRICS else ["metrics=null"])
    sets += [] if options.get("robust", True) else ["averaging.robust=null"]  # benchmarks/robust_overhead.py
    sets += list(options.get("sets", ()))  # any other overrides (benchmarks/overlap.py, benchmarks/traffic.py)
    hosts = TRAINERS + 1  # host 0: the bootstrap peer
    statuses = [work / f"status{host}.json" for host in range(1, hosts)]
    swarm = census_command(work) if options.get("census") else [sys.executable, "-m", "peers"]
    with Lab(hosts, rate=options.get("rate")) as lab:
        sampler = Sampler(lab, list(range(hosts)), statuses)
        sampler.start()
        address = work / "address.json"
        bootstrap = lab.popen(0, [
            *swarm, "bootstrap", "--config", str(CONFIG), "--identity", str(work / "bootstrap.key"),
            "--address-file", str(address), "--set", f"network.listen_host={lab.ip(0)}",
            *([] if KEEP_METRICS else ["--set", "metrics=null"])], log=work / "bootstrap.log")
        started = wait_for_file(address, bootstrap, 90)
        if started is None:
            sampler.finish()
            return dict(error=f"the bootstrap peer did not start; see {work / 'bootstrap.log'}")
        maddr = next(m for m in started["maddrs"] if f"/{lab.ip(0)}/" in m)
        trainers = []
        for host in range(1, hosts):
            command = [*swarm, "join", "--config", str(CONFIG), "--initial-peers", maddr,
                       "--status-file", str(statuses[host - 1]), "--set", f"network.listen_host={lab.ip(host)}"]
            for item in sets:
                command += ["--set", item]
            trainers.append(lab.popen(host, command, log=work / f"trainer{host}.log"))
        finished = wait_all(trainers, timeout)
        ticks = sampler.finish()
        if bootstrap.poll() is None:
            bootstrap.send_signal(signal.SIGTERM)
            try:
                bootstrap.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(bootstrap)
        sent = [lab.counters(host)[0] for host in range(hosts)]
    final = [state for state in ticks[-1]["states"] if state is not None]
    if not final:
        return dict(error=f"no trainer status; see {work}")
    curve = loss_curve(ticks)
    return dict(
        samples=sum(s["samples"] for s in final), losses=[s["heldout_loss"] for s in final],
        epochs=[s["epoch"] for s in final], target_epochs=epochs, finished=finished and all(s["finished"] for s in final),
        bytes_total=sum(sent), bytes_bootstrap=sent[0], steady=window(ticks, "epoch", epochs), curve=curve,
        loss_at_target=loss_at(curve, samples),
        own_payload=sum(s.get("averaging", {}).get("bytes_sent", 0) for s in final) if options["mode"] == "diloco" else None,
        averaging=[s.get("averaging", {}) for s in final],
        utilization=[s.get("utilization") for s in final], time_split=[s.get("time_split", {}) for s in final],
        census=read_census(work) if options.get("census") else None,
    )


def sync_loss_at(results: dict[str, dict], samples: int) -> Optional[float]:
    """sync's held-out loss at ``samples`` (interpolated on its curve), or its final loss if out of range."""
    sync = results.get("sync", {})
    if "losses" not in sync:
        return None
    return loss_at(sync.get("curve", []), samples) or median(sync["losses"])


def per_sample(r: dict, steady: bool) -> Optional[float]:
    if steady:
        return r["steady"]["bytes"] / r["steady"]["samples"] if r.get("steady") else None
    return r["bytes_total"] / r["samples"] if r.get("samples") else None


def print_table(results: dict[str, dict]) -> list[str]:
    sync = results.get("sync", {})
    sync_bps = {steady: per_sample(sync, steady) if "samples" in sync else None for steady in (False, True)}
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", r["error"]])
            continue
        loss, reference = median(r["losses"]), sync_loss_at(results, r["samples"])
        spread = max(r["losses"]) - min(r["losses"])
        whole, steady = per_sample(r, False), per_sample(r, True)

        def factor(mine, theirs):
            return f"{theirs / mine:.0f}x" if mine and theirs else "-"

        window_ = r.get("steady") or {}
        payload = window_.get("payload") or None
        rows.append([
            name, r["samples"], f"{loss:.4f}" + (f" (±{spread / 2:.4f})" if len(r["losses"]) > 1 else ""),
            "1 (reference)" if name == "sync" else f"{loss / reference:.3f}" if reference else "-",
            f"{r['bytes_total'] / 1e6:.1f}", f"{whole / 1e3:.2f}" if whole is not None else "-",
            f"{steady / 1e3:.2f}" if steady is not None else "-",
            f"{factor(whole, sync_bps[False])} / {factor(steady, sync_bps[True])}" if name != "sync" else "1x / 1x",
            f"{payload / window_['samples'] / 1e3:.2f}" if payload else "-",
            f"{(window_['bytes'] - payload) / window_['seconds'] / 1e3:.1f}" if payload else "-",
            f"{r['seconds']:.0f}",
            "" if r.get("finished", True) else "did not finish in time",
        ])
    print(markdown_table(["config", "samples", "held-out loss", "÷ sync at equal samples", "MB sent (all hosts)",
                          "KB sent / sample", "KB / sample, steady state", "sync's bytes/sample ÷ this (whole / steady)",
                          "steady: averaging payload KB / sample (own counter)", "steady: other traffic KB/s (DHT, headers)",
                          "wall s", "note"], rows))
    lines = []
    for name in [name for name in CONFIGS if name.startswith("diloco")]:
        r = results.get(name, {})
        reference = sync_loss_at(results, r.get("samples", 0)) if r else None
        if "error" in r or not r or not sync_bps[False] or not reference:
            continue
        factors = [sync_bps[steady] / per_sample(r, steady) if sync_bps[steady] and per_sample(r, steady) else None
                   for steady in (False, True)]
        loss_ratio = median(r["losses"]) / reference
        shown = " / ".join(f"{f:.0f}x" if f else "-" for f in factors)
        measured = [f for f in factors if f is not None]  # a run of one round has no steady state
        verdict = ("met" if measured and all(f >= 100 for f in measured)
                   else "met in steady state only" if factors[1] is not None and factors[1] >= 100 else "missed")
        lines.append(f"{name}: {shown} fewer bytes per sample than uncompressed sync (whole run / steady state; target "
                     f"≥ 100x: {verdict}); held-out loss "
                     f"{loss_ratio:.3f}x sync's at equal samples ({'met' if loss_ratio <= 1.05 else 'missed'}: target ≤ 1.05x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4800, help="samples per configuration, all trainers together")
    parser.add_argument("--quick", action="store_true", help="2400 samples")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one configuration may take")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/training.json)")
    parser.add_argument("--keep", type=Path, help="keep logs and status files in this folder")
    parser.add_argument("--metrics", action="store_true",
                        help="keep the config's metrics records (off by default: monitoring, not averaging)")
    args = parser.parse_args(argv)
    global KEEP_METRICS
    KEEP_METRICS = args.metrics
    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    samples = 2400 if args.quick else args.samples
    env = environment()
    started = time.monotonic()
    results: dict[str, dict] = {}
    loads = []
    with TemporaryDirectory(prefix="swb-training-") as tmp:
        root = args.keep or Path(tmp)
        for name in [n.strip() for n in args.configs.split(",") if n.strip()]:
            kind, options = CONFIGS[name]
            work = root / name.replace(" ", "_").replace("=", "")
            work.mkdir(parents=True, exist_ok=True)
            loads.append(load_average()[0])
            t0 = time.monotonic()
            run = {"local": run_local, "ddp": run_ddp, "swarm": run_swarm}[kind]
            results[name] = {**run(options, samples, work, args.timeout), "seconds": time.monotonic() - t0}
            print(f"trained {name} in {time.monotonic() - t0:.0f}s (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    print(f"{samples} samples per configuration (debug model, batch {BATCH}; swarm and DDP: {TRAINERS} trainers; "
          f"swarm peers' metrics records {'on' if KEEP_METRICS else 'off'}); "
          f"load average {min(loads):.1f}-{max(loads):.1f} on {env['cpus']} CPUs\n")
    lines = print_table(results)
    print()
    for line in lines:
        print(line)
    path = write_json("training.json", dict(environment=env, samples=samples, loads=loads, results=results, metrics=KEEP_METRICS,
                                            targets=lines, seconds=time.monotonic() - started), args.out)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
