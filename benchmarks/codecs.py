"""Codec benchmark: bytes ratio, error and encode+decode time of every codec, next to hivemind's own.

    .venv/bin/python -m benchmarks.codecs [--reps 7] [--out benchmarks/results/codecs.json]

Inputs are N(0, 1) fp32: a vector of 4M values and a 2048 x 2048 matrix (also 4M values). Rows:
- ``hivemind``: hivemind 1.1.12's built-in codecs used raw (serialize_torch_tensor +
  deserialize_torch_tensor with a CompressionType): the baseline, measured in the same run;
- ``swarm``: our codec by name (make_codec), encoded and decoded by a receiver;
- ``swarm+EF``: the same through the compression plan with error feedback, as training sends it (the
  plan adds the residual, the sender also decodes its own payload to keep the new residual), plus the
  receiver's decode; one peer, so the all-reduce is the identity;
- ``powersgd``: PowerSGD.average on the matrix with error feedback, one peer (the all-reduce is the
  identity), so the time is the compression math alone; its bytes ratio is (n + m) r / (n m).

Time is the median of ``--reps`` calls after one warm-up call (the first blockwise call also pays
for importing bitsandbytes, ~1.7 s); the rows compared with one hivemind codec take turns within
each repetition, so that load from other processes on a shared machine hits them alike.
Errors are those of the warm-up call: ||x - x^|| / ||x|| and mean((x - x^)^2). PowerSGD's error on
N(0, 1) is its worst case (a full-rank matrix with a flat spectrum); gradients are far closer to
low rank, and error feedback re-sends what it drops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import hivemind
import numpy as np
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm.compression.payloads import decode_payload
from swarm.compression.plan import CompressionPlan
from swarm.compression.powersgd import PowerSGD
from swarm.compression.registry import PER_TENSOR_CODEC_NAMES, make_codec, wire_codecs

RESULTS = Path(__file__).resolve().parent / "results" / "codecs.json"
HIVEMIND_TYPES = {  # our name -> the hivemind CompressionType it is compared with
    "none": "NONE",
    "fp16": "FLOAT16",
    "scaled-fp16": "MEANSTD_16BIT",
    "uint8": "UNIFORM_8BIT",
    "quantile8": "QUANTILE_8BIT",
    "blockwise8": "BLOCKWISE_8BIT",
    "adaptive": "BLOCKWISE_8BIT",  # 4M values is above the threshold: blockwise 8-bit
    "sparse": "BLOCKWISE_8BIT",  # swarm's own format (1 % of the values, 4 bits), next to what DiLoCo sent before
}
# /work/shared/BASELINES.md: hivemind 1.1.12 on 4M fp32 values, measured earlier on this kind of machine.
EARLIER_MS = {"FLOAT16": 40.0, "UNIFORM_8BIT": 30.0, "QUANTILE_8BIT": 190.0, "BLOCKWISE_8BIT": 30.0}
POWERSGD_RANKS = (4, 32)

# A codec run: x -> (decoded x, bytes on the wire, seconds encoding, seconds decoding).
Run = Callable[[torch.Tensor], tuple[torch.Tensor, int, float, float]]


def hivemind_run(type_name: str) -> Run:
    compression_type = runtime_pb2.CompressionType.Value(type_name)

    def run(x):
        start = time.perf_counter()
        payload = serialize_torch_tensor(x, compression_type)
        middle = time.perf_counter()
        decoded = deserialize_torch_tensor(payload)
        return decoded, payload.ByteSize(), middle - start, time.perf_counter() - middle

    return run


def decoder(name: str) -> Callable[[runtime_pb2.Tensor], torch.Tensor]:
    """hivemind's decoder, except for swarm's own sparse format, which only swarm's decode_payload reads."""
    if name != "sparse":
        return deserialize_torch_tensor
    return lambda payload: decode_payload(payload, accepted=wire_codecs(name))


def swarm_run(name: str) -> Run:
    codec, deserialize_torch_tensor = make_codec(name), decoder(name)

    def run(x):
        start = time.perf_counter()
        payload = codec.compress(x, CompressionInfo.from_tensor(x))
        middle = time.perf_counter()
        decoded = deserialize_torch_tensor(payload)
        return decoded, payload.ByteSize(), middle - start, time.perf_counter() - middle

    return run


def error_feedback_run(name: str) -> Run:
    plan, wire, deserialize_torch_tensor = CompressionPlan(codec=name, error_feedback=True), {}, decoder(name)

    def one_peer_allreduce(tensors, phase, choose_codec):
        payloads = [choose_codec(t).compress(t, CompressionInfo.from_tensor(t)) for t in tensors]
        sent = [deserialize_torch_tensor(payload) for payload in payloads]  # the sender's own decode
        wire.update(bytes=sum(payload.ByteSize() for payload in payloads), payload=payloads[0])
        return sent, sent

    def run(x):
        start = time.perf_counter()
        plan.average([x], one_peer_allreduce)  # residual in, encode, own decode, residual update
        middle = time.perf_counter()
        decoded = deserialize_torch_tensor(wire["payload"])  # what the receiver does
        return decoded, wire["bytes"], middle - start, time.perf_counter() - middle

    return run


def powersgd_run(rank: int) -> Run:
    powersgd = PowerSGD(rank=rank)

    def run(x):
        start = time.perf_counter()
        (decoded,) = powersgd.average([x], lambda tensors: tensors)
        elapsed = time.perf_counter() - start
        return decoded, round(powersgd.plan([x.shape]).ratio * x.numel() * 4), elapsed, 0.0

    return run


def errors(decoded: torch.Tensor, nbytes: int, x: torch.Tensor) -> dict:
    diff = decoded.double() - x.double()
    return dict(bytes=nbytes, ratio=nbytes / (x.numel() * x.element_size()),
                relative_error=float(diff.norm() / x.double().norm()), mse=float(diff.pow(2).mean()))


def measure_group(runs: list[Run], x: torch.Tensor, reps: int) -> list[dict]:
    """Time the runs of one group interleaved, so that load from other processes hits them alike."""
    rows = [errors(*run(x)[:2], x) for run in runs]  # warm-up: imports, allocations, the first residual
    times: list[list[tuple[float, float]]] = [[] for _ in runs]
    for _ in range(reps):
        for index, run in enumerate(runs):
            times[index].append(run(x)[2:])
    for row, samples in zip(rows, times):
        totals = [encode + decode for encode, decode in samples]
        row.update(encode_ms=1e3 * statistics.median(t[0] for t in samples),
                   decode_ms=1e3 * statistics.median(t[1] for t in samples),
                   total_ms=1e3 * statistics.median(totals), min_ms=1e3 * min(totals),
                   throughput_mb_s=x.numel() * x.element_size() / 1e6 / statistics.median(totals))
    return rows


def groups() -> list[tuple[str, str, list[tuple[str, str, Run]]]]:
    """(input, hivemind type, [(implementation, codec, run), ...]): the hivemind baseline comes first."""
    result = []
    for input_name in ("vector", "matrix"):
        for type_name in dict.fromkeys(HIVEMIND_TYPES.values()):
            members = [("hivemind", type_name, hivemind_run(type_name))]
            for name in (name for name in PER_TENSOR_CODEC_NAMES if HIVEMIND_TYPES[name] == type_name):
                members += [("swarm", name, swarm_run(name)), ("swarm+EF", name, error_feedback_run(name))]
            if type_name == "NONE" and input_name == "matrix":  # PowerSGD is compared with sending it raw
                members += [("powersgd", f"powersgd r={rank}", powersgd_run(rank)) for rank in POWERSGD_RANKS]
            result.append((input_name, type_name, members))
    return result


def print_table(results: list[dict]) -> None:
    header = ("impl", "codec", "input", "ratio", "rel.err", "MSE", "enc+dec ms", "MB/s", "x hivemind", "earlier ms")
    print(" | ".join(f"{h:>14}" if i > 2 else f"{h:<17}" for i, h in enumerate(header)))
    for row in results:
        cells = [row["impl"], row["codec"], row["input"], f"{row['ratio']:.4f}", f"{row['relative_error']:.2e}",
                 f"{row['mse']:.2e}", f"{row['total_ms']:.1f}", f"{row['throughput_mb_s']:.0f}",
                 f"{row['time_vs_hivemind']:.2f}" if row["time_vs_hivemind"] is not None else "-",
                 f"{row['earlier_ms']:.0f}" if row["earlier_ms"] is not None else "-"]
        print(" | ".join(f"{c:>14}" if i > 2 else f"{c:<17}" for i, c in enumerate(cells)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed calls per row, after one warm-up call")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # hivemind 1.1.12 under torch 2.13 and NumPy 2.x deprecations

    generator = torch.Generator().manual_seed(0)
    inputs = {"vector": torch.randn(4 * 2**20, generator=generator),
              "matrix": torch.randn(2048, 2048, generator=generator)}
    results = []
    for input_name, type_name, members in groups():
        rows = measure_group([run for _, _, run in members], inputs[input_name], args.reps)
        baseline_ms = rows[0]["total_ms"]
        for (impl, codec, _), row in zip(members, rows):
            row = dict(impl=impl, codec=codec, input=input_name, values=inputs[input_name].numel(), **row)
            row["time_vs_hivemind"] = row["total_ms"] / baseline_ms
            row["earlier_ms"] = EARLIER_MS.get(codec) if impl == "hivemind" and input_name == "vector" else None
            results.append(row)
        timings = ", ".join(f"{row['total_ms']:.0f} ms" for row in rows)
        print(f"measured {input_name} {type_name}: {timings}", file=sys.stderr, flush=True)

    print_table(results)
    environment = dict(python=platform.python_version(), torch=torch.__version__, hivemind=hivemind.__version__,
                       numpy=np.__version__, torch_threads=torch.get_num_threads(), machine=platform.machine())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(environment=environment, reps=args.reps, rows=results), indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
