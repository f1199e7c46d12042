"""What the training benchmark samples from a running swarm, and what it reads off the samples.

A :class:`Sampler` takes a tick every half second (bytes the lab's hosts sent, each trainer's status
file); :func:`window` cuts the steady-state part of a run out of the ticks, :func:`loss_curve` and
:func:`loss_at` give the held-out loss at a number of samples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from harness.netlab import Lab
from swarm.loops import PeriodicLoop


class Sampler:
    """Every ``period`` seconds: bytes sent so far by every host of the lab, and each trainer's status
    file (samples, epoch, held-out loss, finished). Stopped with :meth:`finish`, which takes a last tick
    and raises if sampling died on the way (a benchmark must not report a partial series)."""

    def __init__(self, lab: Lab, hosts: list[int], statuses: list[Path], period: float = 0.5):
        self.lab, self.hosts, self.statuses, self.period = lab, hosts, statuses, period
        self.ticks: list[dict] = []
        self._loop = PeriodicLoop(name="sampler", iteration=self.tick, period=period, initial_wait=period)

    def start(self) -> "Sampler":
        self._loop.start()
        return self

    def tick(self) -> None:
        states = []
        for path in self.statuses:
            try:
                states.append(json.loads(path.read_text()))
            except (FileNotFoundError, ValueError):  # not written yet
                states.append(None)
        self.ticks.append(dict(time=time.monotonic(), sent=sum(self.lab.counters(h)[0] for h in self.hosts),
                               states=states))

    def finish(self, timeout: float = 10.0) -> list[dict]:
        self._loop.shutdown(timeout)
        self._loop.check()
        self.tick()
        return self.ticks


def window(ticks: list[dict], epoch_key: str, last_epoch: int) -> Optional[dict]:
    """Bytes and samples from the first tick at which every trainer is past epoch 0 to the first tick at
    which every trainer has reached the last epoch: whole rounds (or optimizer steps), their averaging
    included, without the start-up (connections, the first round, whose group may have formed before
    every trainer was up) and without the idle wait at the end."""
    def samples(tick):
        return sum(state["samples"] for state in tick["states"])

    usable = [t for t in ticks if all(state is not None for state in t["states"])]
    start = next((t for t in usable if all(s[epoch_key] >= 1 for s in t["states"])), None)
    end = next((t for t in usable if all(s[epoch_key] >= last_epoch for s in t["states"])), None)
    if start is None or end is None or samples(end) <= samples(start):
        return None

    def payload(tick):  # DiLoCo's own count of averaging bytes sent; absent in sync mode and DDP
        return sum(state.get("averaging", {}).get("bytes_sent", 0) for state in tick["states"])

    return dict(bytes=end["sent"] - start["sent"], samples=samples(end) - samples(start),
                seconds=end["time"] - start["time"], payload=payload(end) - payload(start))


def loss_curve(ticks: list[dict]) -> list[tuple[int, float]]:
    """(samples of all trainers together, held-out loss) whenever a trainer published a new held-out loss."""
    points, seen = [], {}
    for tick in ticks:
        if any(state is None for state in tick["states"]):
            continue
        total = sum(state["samples"] for state in tick["states"])
        for index, state in enumerate(tick["states"]):
            key = (state.get("epoch"), state.get("heldout_loss"))
            if state.get("heldout_loss") is not None and seen.get(index) != key:
                seen[index] = key
                points.append((total, state["heldout_loss"]))
    return points


def loss_at(curve: list[tuple[int, float]], samples: int) -> Optional[float]:
    """The held-out loss at ``samples``, interpolated linearly between the two nearest evaluations."""
    before = [p for p in curve if p[0] <= samples]
    after = [p for p in curve if p[0] >= samples]
    if not before or not after:
        return None
    (x0, y0), (x1, y1) = max(before), min(after)
    return y0 if x1 == x0 else y0 + (y1 - y0) * (samples - x0) / (x1 - x0)
