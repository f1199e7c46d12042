"""`swarm join`'s progress lines: one at least every ``period`` seconds, whatever the training loop is
doing, and the progress of a state download while one runs.

It runs in its own thread and only reads: the trainer's :class:`~swarm.train.loop.TrainingStatus`
(which the training loop updates after its steps) and the collaboration's
:class:`~swarm.averaging.progress.DownloadWatch`. So a line still comes while the loop is blocked:
in hivemind's averaging between sync epochs, in a DiLoCo round's all-reduce, or downloading state.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from swarm.averaging.progress import DownloadWatch, StateDownload
from swarm.train.loop import TrainingStatus

logger = logging.getLogger("swarm.progress")

PERIOD = 9.5  # seconds between progress lines: under the promised 10, with room for a loaded machine
DOWNLOAD_PERIOD = 2.0  # seconds between lines of a state download in progress
POLL = 0.5  # seconds between looks for a download that has begun (one shorter than this needs no line)
STALLED_AFTER = 5.0  # a status older than this means the loop is blocked (averaging, catching up)


class ProgressLog:
    """Logs :func:`progress_line` every ``period`` seconds and :func:`download_line` every
    ``download_period`` seconds while a download runs. Start, then shut down (joins the thread)."""

    def __init__(self, status: TrainingStatus, watch: DownloadWatch, *, mode: str, period: float = PERIOD,
                 download_period: float = DOWNLOAD_PERIOD):
        self.status, self.watch, self.period, self.download_period = status, watch, period, download_period
        self.unit = "round" if mode == "diloco" else "epoch"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress lines", daemon=True)

    def start(self) -> "ProgressLog":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():  # also safe before start() (a peer that failed to start)
            self._thread.join(timeout)

    def _run(self) -> None:
        last_line = time.monotonic()
        last_download: Optional[StateDownload] = None
        last_download_line = 0.0
        # wake for the next line on time, and often enough to see a download begin
        while not self._stop.wait(max(0.0, min(last_line + self.period - time.monotonic(), POLL))):
            now = time.monotonic()
            download = self.watch.current
            if download is not None and (download is not last_download or now - last_download_line >= self.download_period):
                logger.info(download_line(download))
                last_download, last_download_line = download, now
            if now - last_line >= self.period:
                logger.info(progress_line(self.status, unit=self.unit, now=time.time()))
                last_line = now


def progress_line(status: TrainingStatus, *, unit: str, now: float) -> str:
    """``epoch 3 | 412 samples/s | loss 2.314 | next epoch: 2,048/4,096 samples, in ~12s | 3 peers``."""
    if not status.started_at:
        return f"{unit} {status.epoch} | starting: joining the swarm, preparing the model"
    parts = [f"{unit} {status.epoch}" + (f" (swarm at {status.swarm_epoch})" if status.swarm_epoch > status.epoch else ""),
             f"{status.samples_per_second:.0f} samples/s",
             f"loss {status.train_loss:.3f}" if status.train_loss is not None else "loss -"]
    upcoming = []
    if status.round_target:
        upcoming.append(f"{status.round_samples or 0:,}/{status.round_target:,} samples")
    if status.next_round_at is not None:
        upcoming.append(f"in ~{_duration(max(status.next_round_at - now, 0.0))}")
    if upcoming:
        parts.append(f"next {unit}: " + ", ".join(upcoming))
    parts.append(f"{status.swarm_peers} peer{'s' if status.swarm_peers != 1 else ''}")
    idle = now - status.updated_at
    if status.updated_at and idle >= STALLED_AFTER:
        parts.append(f"no local step for {_duration(idle)} (averaging with the swarm or catching up)")
    return " | ".join(parts)


def download_line(download: StateDownload) -> str:
    """``downloading state from ab12cd: 1.2/4.1 MB (29%), 3.2 MB/s, ETA 1s``."""
    elapsed = download.elapsed()
    total = f"{download.total / 1e6:.1f} MB" if download.total is not None else "? MB"
    if download.received is None:  # hivemind downloads in its own process: only the time is known
        return f"downloading state from {download.source}: {total} expected, {_duration(elapsed)} so far"
    line = f"downloading state from {download.source}: {download.received / 1e6:.1f}/{total}"
    if download.total:
        line += f" ({min(download.received / download.total, 1.0):.0%})"
    if elapsed > 0:
        line += f", {download.received / elapsed / 1e6:.1f} MB/s"
    eta = download.eta()
    return line + (f", ETA {_duration(eta)}" if eta is not None else "")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
