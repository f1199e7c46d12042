"""A state download in progress, for whoever shows progress (the trainer's progress lines).

The download's own thread (or asyncio loop) writes it; any other thread may read it: each field is
replaced whole, never mutated in place, so a reader sees a consistent enough snapshot for display.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StateDownload:
    """:param source: the donor, as shown (a short peer id, or "the swarm" when hivemind picks it).
    :param total: bytes this peer expects: its own state's size (a donor's state has the same tensors),
      not the donor's claim; None if unknown.
    :param received: bytes of tensor data received so far; None where it cannot be seen (sync mode:
      hivemind downloads inside its averager's own process)."""

    source: str
    total: Optional[int] = None
    received: Optional[int] = None
    started: float = field(default_factory=time.monotonic)

    def on_bytes(self, received: int) -> None:
        """The progress callback of :func:`swarm.averaging.wire.read_tensor_messages`."""
        self.received = received

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> Optional[float]:
        """Seconds left at the rate so far; None until bytes and a total are known."""
        received, total, elapsed = self.received, self.total, self.elapsed()
        if not received or total is None or elapsed <= 0:
            return None
        return max(0.0, (total - received) / (received / elapsed))


class DownloadWatch:
    """Where a peer's state downloads show themselves while they run: the component that downloads
    sets :attr:`current` (one download at a time), whoever shows progress reads it from its own thread.
    The caller makes one and hands it to the collaboration (:func:`swarm.train.factory.build_collaboration`)."""

    def __init__(self):
        self.current: Optional[StateDownload] = None

    def begin(self, source: str, total: Optional[int], *, counts_bytes: bool = True) -> StateDownload:
        """:param counts_bytes: the downloader reports bytes (``on_bytes``); False where it cannot."""
        self.current = download = StateDownload(source=source, total=total, received=0 if counts_bytes else None)
        return download

    def end(self) -> None:
        self.current = None
