"""How long a reader waits for a peer that heartbeats but sends no data (swarm.averaging.wire).

Before issue 11 a reader skipped heartbeats without limit: a member that heartbeats on its data
streams but never delivers held the others until the round's timeout.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.averaging import wire

pytestmark = pytest.mark.timeout(60)


def heartbeats(period: float, then_data: float | None = None):
    """A response stream that heartbeats every ``period`` seconds, then after ``then_data`` seconds
    (never, if None) sends one small tensor."""
    async def stream():
        started = time.monotonic()
        while then_data is None or time.monotonic() - started < then_data:
            yield wire.response(**wire.HEARTBEAT)
            await asyncio.sleep(period)
        payload = runtime_pb2.Tensor(buffer=torch.ones(4).numpy().tobytes(), size=[4], dtype="float32", chunks=1)
        for message in wire.tensor_messages([payload], note="data"):
            yield message
    return stream()


def read(stream, patience: float):
    return asyncio.run(wire.read_tensor_messages(stream, max_bytes=1 << 10, patience=patience))


def test_heartbeats_alone_are_cut_at_the_patience():
    """Before issue 11 a reader skipped heartbeats without limit: a peer that heartbeats but never
    delivers held it until the round's timeout."""
    started = time.monotonic()
    with pytest.raises(wire.Stalled):
        read(heartbeats(0.05), patience=0.5)
    assert 0.5 <= time.monotonic() - started < 1.5


def test_a_slow_heartbeat_does_not_stretch_the_patience():
    started = time.monotonic()
    with pytest.raises(wire.Stalled):
        read(heartbeats(5.0), patience=0.5)
    assert time.monotonic() - started < 1.5


def test_data_within_the_patience_is_read():
    header, payloads = read(heartbeats(0.05, then_data=0.3), patience=1.0)
    assert header == {"count": 1, "note": "data"} and len(payloads) == 1
