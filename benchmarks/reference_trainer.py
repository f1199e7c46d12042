"""The references of the training benchmark: the debug model trained without swarm, in one process or with DDP.

    python -m benchmarks.reference_trainer --config configs/debug.yaml --samples 4800 --accum 12 --out a.json
    GLOO_SOCKET_IFNAME=eth0 python -m benchmarks.reference_trainer ... --world 3 --rank 0 --master 10.1.0.1 --accum 4

Model, data, initial weights, held-out set, optimizer and warm-up are the library's, as a swarm
trainer builds them from the same config (``swarm.train.model.ByteGPT``, ``swarm.train.data.load_dataset``,
``swarm.train.sync.inner_optimizer_factory`` and ``warmup_scheduler_factory``), so that only the way of
training differs:
- one process (``--world 1``): each optimizer step averages ``--accum`` micro-batches of
  ``training.batch_size``, each clipped to ``optimizer.grad_clip`` first, as hivemind.Optimizer averages
  the clipped local gradients of a swarm epoch (``--accum 12`` with batch 16 = the debug swarm's 192);
  ``--accum 1`` is a plain loop with one step per batch;
- DDP over gloo (``--world N``): every rank accumulates ``--accum`` micro-batches without syncing, then
  DistributedDataParallel all-reduces the gradient once, which is clipped and stepped (standard DDP).
The warm-up counts optimizer steps (a swarm epoch is one step). Writes the final held-out loss and the
samples seen (all ranks together) to ``--out`` as JSON (rank 0 only with DDP).
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from contextlib import nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from swarm.config.loading import load_config
from swarm.train.data import load_dataset
from swarm.train.model import ByteGPT
from swarm.train.sync import inner_optimizer_factory, warmup_scheduler_factory


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--samples", type=int, required=True, help="samples to train on, all ranks together")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step and rank")
    parser.add_argument("--warmup", action="store_true", help="use optimizer.warmup_epochs, counted in optimizer steps")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--master", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=29501)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--status", type=Path, help="rank 0 keeps {samples, step, finished} here, updated every step")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    config = load_config(args.config)
    torch.set_num_threads(config.training.threads or 1)
    batch, seq_len = config.training.batch_size, config.model.seq_len
    dataset = load_dataset(config.data, seq_len)
    heldout = dataset.heldout_batches(config.training.eval_batches, batch, seq_len)
    torch.manual_seed(zlib.crc32(config.run_id.encode()) + config.training.seed)  # as swarm's trainers do
    model = ByteGPT(config.model)
    ddp = args.world > 1
    if ddp:
        dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                                world_size=args.world, timeout=timedelta(seconds=300))
    module = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = inner_optimizer_factory(config.optimizer)(model.parameters())
    scheduler = warmup_scheduler_factory(config.optimizer)(optimizer) if args.warmup else None
    generator = torch.Generator().manual_seed(config.training.seed * 1_000_003 + args.rank)
    sample = partial(dataset.sample_batch, batch, seq_len, generator)
    per_step = batch * args.accum * args.world
    steps = -(-args.samples // per_step)
    started = time.perf_counter()
    initial = evaluate(model, heldout)
    for step in range(steps):
        model.train()
        if ddp:
            ddp_gradient(module, model, sample, args.accum, config.optimizer.grad_clip)
        else:
            local_gradient(model, sample, args.accum, config.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if args.status is not None and args.rank == 0:
            write_status(args.status, dict(samples=(step + 1) * per_step, step=step + 1, finished=False))
    final = evaluate(model, heldout)
    if args.status is not None and args.rank == 0:
        write_status(args.status, dict(samples=steps * per_step, step=steps, finished=True, heldout_loss=final))
    if args.rank == 0:
        args.out.write_text(json.dumps(dict(
            heldout_loss=final, initial_heldout_loss=initial, samples=steps * per_step, steps=steps,
            world=args.world, accum=args.accum, seconds=time.perf_counter() - started)))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def ddp_gradient(module, model: ByteGPT, sample, accum: int, clip: float | None) -> None:
    """Standard DDP: accumulate ``accum`` micro-batches without syncing, one all-reduce, then clip."""
    for micro in range(accum):
        with module.no_sync() if micro < accum - 1 else nullcontext():
            inputs, targets = sample()
            (loss_of(module, inputs, targets) / accum).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)


def local_gradient(model: ByteGPT, sample, accum: int, clip: float | None) -> None:
    """The mean of ``accum`` micro-batch gradients, each clipped first (as hivemind.Optimizer averages
    clipped local gradients)."""
    totals = [torch.zeros_like(p) for p in model.parameters()]
    for _micro in range(accum):
        inputs, targets = sample()
        model.loss(inputs, targets).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for total, p in zip(totals, model.parameters()):
            total.add_(p.grad)
            p.grad = None
    for total, p in zip(totals, model.parameters()):
        p.grad = total / accum


def write_status(path: Path, status: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(status))
    temporary.replace(path)


def loss_of(module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's loss through ``module`` (DDP's forward is what registers the gradient hooks)."""
    logits = module(inputs)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: ByteGPT, heldout) -> float:
    model.eval()
    losses = [model.loss(x, y).item() for x, y in heldout]
    return float(sum(losses) / len(losses))


if __name__ == "__main__":
    main()
