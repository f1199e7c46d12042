"""How cost grows with the number of peers and the model's size, and what that says about 100 peers and 1B parameters.

    sudo .venv/bin/python -m benchmarks.scaling [--sizes 2,3,4] [--rounds 2] [--quick]

Two model sizes, the debug preset (``configs/debug.yaml``, 0.87M parameters) and the default one
(``configs/default.yaml``, 10.9M), measured in two parts:
- compute: one process trains the model as a trainer does (``swarm.train.model.ByteGPT``, the config's
  AdamW, its batch and sequence length, one thread): median seconds per step and peak resident memory
  (model, optimizer state, activations), in a fresh process per size so the peak is that size's alone;
- all-reduce: N peers (``--sizes``) in network namespaces on 100 Mbit/s links (``harness/netlab.py``,
  the links of ``allreduce_links.py``) all-reduce one fp32 tensor of each model's size, uncompressed
  (``harness/averaging_peer.py``: DHT, p2pd and swarm's butterfly all-reduce): round time next to the
  bandwidth bound 2(N-1)/N·M/B, wire bytes each peer sent, CPU seconds per round, peak memory of the
  peer and of its p2pd.
From those terms a cost model (least squares over the all-reduce points, t = a + b·X + c·(N-1) with X =
2(N-1)/N·M the bytes each peer sends) is fitted and extrapolated to 100 peers and 1B parameters;
docs/scaling.md states its assumptions. Needs root for the all-reduce part (skipped with a message
without it). Prints the tables and writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from benchmarks.allreduce_links import LINK, RATE_BITS, bound_seconds, run_swarm, summarize_swarm
from benchmarks.report import environment, markdown_table, median, span, write_json
from harness.netlab import available, load_average

HERE = Path(__file__).resolve().parent
MODELS = {"debug": HERE.parent / "configs" / "debug.yaml", "default": HERE.parent / "configs" / "default.yaml"}
TARGET_PEERS, TARGET_PARAMS = 100, 1_000_000_000


def measure_compute(config_path: Path, steps: int) -> dict:
    """Train ``steps`` steps of the config's model in this process; seconds per step and peak memory."""
    from swarm.config.loading import load_config
    from swarm.train.model import ByteGPT
    from swarm.train.sync import inner_optimizer_factory

    config = load_config(config_path)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ByteGPT(config.model)
    optimizer = inner_optimizer_factory(config.optimizer)(model.parameters())
    batch, seq_len = config.training.batch_size, config.model.seq_len
    batch = batch if isinstance(batch, int) else 16  # `auto` is chosen from memory at join; the debug preset's 16 here
    tokens = torch.randint(0, 256, (batch, seq_len + 1))
    times = []
    for step in range(steps + 2):  # two warm-up steps (allocations, first kernels) left out
        started = time.perf_counter()
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - started)
    return dict(params=sum(p.numel() for p in model.parameters()), batch=batch, seq_len=seq_len,
                step_seconds=median(times), peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def compute_terms(steps: int) -> dict[str, dict]:
    """:func:`measure_compute` for every model, each in a fresh process (its own peak memory)."""
    found = {}
    for name, path in MODELS.items():
        output = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--compute", str(path), "--steps", str(steps)],
                                capture_output=True, text=True, cwd=HERE.parent, timeout=1800)
        if output.returncode != 0:
            raise RuntimeError(f"compute measurement of {name} failed: {output.stderr[-2000:]}")
        found[name] = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"compute {name}: {found[name]}", file=sys.stderr, flush=True)
    return found


def allreduce_terms(sizes: list[int], compute: dict[str, dict], rounds: int, root: Path, timeout: float) -> list[dict]:
    rows = []
    for model, terms in compute.items():
        numel = terms["params"]
        for n in sizes:
            work = root / f"{model}-{n}"
            work.mkdir(parents=True, exist_ok=True)
            load, t0 = load_average()[0], time.monotonic()
            records = run_swarm(n, ["none"], rounds, work, timeout, numel=numel)
            for row in summarize_swarm(n, records, {"none": numel * 4}, numel=numel):
                rows.append({**row, "model": model, "load": load})
            print(f"all-reduce {model} N={n} in {time.monotonic() - t0:.0f}s (load {load:.1f})", file=sys.stderr, flush=True)
    return rows


def _least_squares(design: list[list[float]], values: list[float]) -> list[float]:
    solution = torch.linalg.lstsq(torch.tensor(design, dtype=torch.float64),
                                  torch.tensor([[v] for v in values], dtype=torch.float64)).solution
    return solution.flatten().tolist()


def fit(rows: list[dict]) -> dict:
    """Least squares over the measured rounds: time t = a + b·X + c·(N-1) (X: bytes each peer sends, fp32;
    c is dropped when the fit makes it negative: the points cannot tell a per-peer cost from noise), CPU
    seconds per round of a peer and its p2pd = d·X, and the peer's peak memory = m0 + k·M."""
    points = [(row["n"], row["numel"] * 4, seconds) for row in rows for seconds in row["seconds"]]
    if len({(n, m) for n, m, _ in points}) < 3:
        return {}
    sends = [2 * (n - 1) / n * m for n, m, _ in points]
    times = [t for _, _, t in points]
    a, b, c = _least_squares([[1.0, x, n - 1.0] for x, (n, _, _) in zip(sends, points)], times)
    if c < 0:
        (a, b), c = _least_squares([[1.0, x] for x in sends], times), 0.0
    error = max(abs(a + b * x + c * (n - 1) - t) / t for x, (n, _, t) in zip(sends, points))
    cpu = [(2 * (row["n"] - 1) / row["n"] * row["numel"] * 4, sum(v or 0 for v in row["cpu"].values())) for row in rows]
    (d,) = _least_squares([[x] for x, _ in cpu], [seconds for _, seconds in cpu])
    memory = [(row["numel"] * 4, row["peak_mib"].get("peer", 0.0) * 2**20) for row in rows]
    m0, k = _least_squares([[1.0, m] for m, _ in memory], [peak for _, peak in memory])
    return dict(a=a, b=b, c=c, effective_mbit=8 / b / 1e6 if b > 0 else None, max_relative_error=error,
                cpu_seconds_per_gb=d * 1e9, memory_base_mib=m0 / 2**20, memory_per_byte=k)


def extrapolate(model: dict) -> list[list]:
    """The all-reduce round of 100 peers and 1B parameters per codec (bytes per value) and link rate:
    the fitted fixed and per-peer terms, the link at that rate, and the fitted CPU per byte (the part of b
    that is not the 100 Mbit/s link) as measured here."""
    rows = []
    cpu_part = max(model["b"] - 8 / RATE_BITS, 0.0)
    for codec, bytes_per_value in (("none (fp32)", 4.0), ("blockwise8", 1.0)):
        m = TARGET_PARAMS * bytes_per_value
        x = 2 * (TARGET_PEERS - 1) / TARGET_PEERS * m
        for rate in (100e6, 1e9):
            seconds = model["a"] + x * (8 / rate + cpu_part) + model["c"] * (TARGET_PEERS - 1)
            rows.append([codec, f"{rate / 1e6:.0f} Mbit/s", f"{x / 1e9:.2f} GB", f"{seconds:.0f} s",
                         f"{bound_seconds(TARGET_PEERS, m) * RATE_BITS / rate:.0f} s",
                         # the peer's buffers scale with the fp32 tensor it averages, whatever the codec sends
                         f"{(model['memory_base_mib'] * 2**20 + model['memory_per_byte'] * 4 * TARGET_PARAMS) / 2**30:.0f} GiB"])
    return rows


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,3,4", help="numbers of peers, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed all-reduce rounds per point (after one warm-up)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--quick", action="store_true", help="2 rounds per point, 3 steps per model")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/scaling.json)")
    parser.add_argument("--compute", type=Path, help=argparse.SUPPRESS)  # internal: one compute measurement
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.compute:
        print(json.dumps(measure_compute(args.compute, args.steps)))
        return 0
    rounds, steps = (2, 3) if args.quick else (args.rounds, args.steps)
    started, env = time.monotonic(), environment()
    compute = compute_terms(steps)
    print(markdown_table(["model", "parameters", "batch x seq", "s/step (1 thread)", "peak memory, training (MiB)",
                          "MiB per M params"],
                         [[name, f"{t['params'] / 1e6:.2f}M", f"{t['batch']}x{t['seq_len']}", t["step_seconds"],
                           round(t["peak_mib"]), t["peak_mib"] / (t["params"] / 1e6)] for name, t in compute.items()]))
    reason = available()
    rows, model = [], {}
    if reason:
        print(f"\nall-reduce part skipped: {reason}")
    else:
        with TemporaryDirectory(prefix="swb-scaling-") as tmp:
            rows = allreduce_terms([int(s) for s in args.sizes.split(",")], compute, rounds, Path(tmp), args.timeout)
        print()
        print(markdown_table(
            ["model", "N", "MiB", "rounds", "s/round", "÷ bound", "wire MB sent per peer", "CPU s/round (peer / p2pd)",
             "peak MiB (peer / p2pd)", "load"],
            [[row["model"], row["n"], f"{row['numel'] * 4 / 2**20:.1f}", row["rounds"], span(row["seconds"]),
              span(row["time_vs_bound"]), span([w / 1e6 for w in row["wire_sent"]], 1),
              f"{row['cpu'].get('peer', 0) or 0:.2f} / {row['cpu'].get('p2pd', 0) or 0:.2f}",
              f"{row['peak_mib'].get('peer', 0):.0f} / {row['peak_mib'].get('p2pd', 0):.0f}", f"{row['load']:.1f}"]
             for row in rows]))
        model = fit(rows)
        if model:
            print(f"\nfit t = a + b·X + c·(N-1): a = {model['a']:.2f} s, b = {model['b'] * 1e9:.2f} s/GB "
                  f"(effective {model['effective_mbit']:.0f} Mbit/s on 100 Mbit/s links), c = {model['c']:.2f} s per peer; "
                  f"worst point off by {model['max_relative_error']:.0%}; CPU (peer + p2pd) "
                  f"{model['cpu_seconds_per_gb']:.0f} s per GB sent; peer's peak memory "
                  f"{model['memory_base_mib']:.0f} MiB + {model['memory_per_byte']:.1f} x the tensor")
            print(f"\nExtrapolated all-reduce round, {TARGET_PEERS} peers, {TARGET_PARAMS / 1e9:.0f}B parameters "
                  "(docs/scaling.md: assumptions):")
            print(markdown_table(["codec", "links", "bytes each peer sends", "round (model)", "bandwidth bound",
                                  "all-reduce peak memory (model)"], extrapolate(model)))
    path = write_json("scaling.json", dict(environment=env, link=LINK, compute=compute, rows=rows, fit=model,
                                           seconds=time.monotonic() - started), args.out)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
