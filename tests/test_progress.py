"""`swarm join`'s progress lines and state-download progress (fast lane: no peers).

The download's bytes are counted by the real reader of swarm's wire format, fed a real serialized state
in chunks; the lines come from the real :class:`peers.progress.ProgressLog` thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch
from hivemind.compression.serialization import serialize_torch_tensor
from hivemind.utils.streaming import split_for_streaming

from peers.progress import ProgressLog, download_line, progress_line
from swarm.averaging import wire
from swarm.averaging.progress import DownloadWatch, StateDownload
from swarm.train.loop import TrainingStatus


def test_download_progress_counts_every_chunk_up_to_the_total():
    tensors = [torch.randn(300_000), torch.randn(1000)]  # 1.2 MB and 4 kB: the first spans several chunks
    payloads = [serialize_torch_tensor(t) for t in tensors]
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert len(list(split_for_streaming(payloads[0]))) > 1, "one chunk would prove nothing about progress"
    download = StateDownload(source="ab12cd", total=total)
    seen = []

    def on_bytes(received: int) -> None:
        seen.append(received)
        download.on_bytes(received)

    async def stream():
        for message in wire.tensor_messages(payloads, note="state"):
            yield message

    header, received = asyncio.run(wire.read_tensor_messages(stream(), max_bytes=2 * total, on_bytes=on_bytes))
    assert len(received) == 2 and header["note"] == "state"
    assert len(seen) > 2 and seen == sorted(seen) and seen[-1] == download.received == total
    line = download_line(download)
    assert line.startswith("downloading state from ab12cd: 1.2/1.2 MB (100%)") and "MB/s" in line and "ETA 0s" in line


def test_download_line_midway_and_where_bytes_cannot_be_seen():
    midway = StateDownload(source="ab12cd", total=4_000_000, received=1_000_000, started=time.monotonic() - 2.0)
    line = download_line(midway)
    assert "1.0/4.0 MB (25%)" in line and "0.5 MB/s" in line and "ETA 6s" in line, line
    hivemind = StateDownload(source="the swarm", total=4_000_000, started=time.monotonic() - 12.0)
    assert download_line(hivemind) == "downloading state from the swarm: 4.0 MB expected, 12s so far"


def test_progress_line_says_speed_loss_and_time_to_the_next_round():
    now = time.time()
    status = TrainingStatus(peer_id="QmPeer", role="volunteer", epoch=3, samples_per_second=412.4, train_loss=2.3141,
                            swarm_peers=3, swarm_epoch=3, round_samples=2048, round_target=4096,
                            next_round_at=now + 12.2, started_at=now - 60, updated_at=now - 0.5)
    assert progress_line(status, unit="epoch", now=now) == \
        "epoch 3 | 412 samples/s | loss 2.314 | next epoch: 2,048/4,096 samples, in ~12s | 3 peers"
    status.updated_at = now - 25  # the loop is blocked: in hivemind's averaging between sync epochs
    assert progress_line(status, unit="round", now=now).endswith(
        "| no local step for 25s (averaging with the swarm or catching up)")
    assert "starting" in progress_line(TrainingStatus(peer_id="QmPeer", role="volunteer"), unit="round", now=now)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines, self.changed = [], threading.Condition()

    def emit(self, record):
        with self.changed:
            self.lines.append(record.getMessage())
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.lines), timeout), self.lines
            return list(self.lines)


@pytest.mark.timeout(60)
def test_progress_log_keeps_its_period_while_the_loop_is_blocked_and_shows_downloads():
    now = time.time()
    status = TrainingStatus(peer_id="QmPeer", role="volunteer", epoch=1, started_at=now, updated_at=now)
    watch = DownloadWatch()
    handler = Lines()
    logger = logging.getLogger("swarm.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    progress = ProgressLog(status, watch, mode="sync", period=0.5, download_period=0.2).start()
    try:
        # nothing updates the status (a blocked loop): lines still come, one per period
        lines = handler.wait_for(lambda lines: sum(line.startswith("epoch 1") for line in lines) >= 3, timeout=30)
        assert all(line.startswith("epoch 1") for line in lines)
        watch.begin("ab12cd", 2_000_000).on_bytes(500_000)
        handler.wait_for(lambda lines: any("downloading state from ab12cd: 0.5/2.0 MB (25%)" in line
                                           for line in lines), timeout=30)
        watch.end()
    finally:
        progress.shutdown()
        logger.removeHandler(handler)
    assert not progress._thread.is_alive()
