"""End-to-end: real peers as real processes on 127.0.0.1, started through the `swarm` CLI."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from harness.processes import wait_for

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)

# Held-out loss must fall by at least this much (nats per byte). An untrained byte model sits at
# ln(256) = 5.55; evaluations of the same model vary by about 0.05 across the held-out batches, and
# a model that has learned only which bytes are frequent is already below 4.5. One nat is far beyond
# noise and reached within a handful of swarm epochs of the debug preset.
MIN_LOSS_DROP = 1.0


def assert_one_model(checkpoints: dict) -> None:
    """Every peer that finished the run holds the same model and optimizer state, bit for bit.

    During a run a peer can drift by a step (hivemind lets a peer whose gradient round failed step on
    its own gradients, and a state-averaging round that lost a part leaves that part local); the next
    epoch repairs it. After the last epoch, the finished peers settle on one final state
    (:mod:`swarm.train.agreement`), so their checkpoints record one state hash."""
    loaded = {name: torch.load(path, weights_only=True) for name, path in checkpoints.items()}
    hashes = {name: checkpoint["state_hash"][:12] for name, checkpoint in loaded.items()}
    if len(set(hashes.values())) > 1:
        first, *others = sorted(loaded)
        differences = {other: max(float((tensor - loaded[other]["model"][key]).abs().max())
                                  for key, tensor in loaded[first]["model"].items()) for other in others}
        raise AssertionError(f"the peers ended with different states: {hashes}; largest parameter difference "
                             f"from {first}: {differences}")


@pytest.mark.timeout(300)
def test_three_trainers_train_one_model(swarm):
    epochs = 5  # held-out loss is ~4.3 at epoch 3 and ~3.7 at epoch 5, from 5.6: well past MIN_LOSS_DROP
    _, address = swarm.bootstrap()
    names = ["a", "b", "c"]
    trainers = [swarm.trainer(name, [address], f"training.max_epochs={epochs}", "data.num_shards=3",
                              f"data.shard_index={index}") for index, name in enumerate(names)]
    # A status counts the peers a trainer sees at the time it is written, and the last one is written
    # after the others may have left: whether they saw each other is read while they train.
    wait_for(lambda: any((status := swarm.status(name)) and status["swarm_peers"] == 3 for name in names),
             timeout=180, what="a trainer to see all three trainers in the swarm", alive=trainers)
    for trainer in trainers:
        assert trainer.proc.wait(240) == 0, trainer.log_tail()

    statuses = [swarm.status(name) for name in names]
    assert [status["epoch"] for status in statuses] == [epochs] * 3
    assert all(status["swarm_peers"] >= 1 for status in statuses)
    for status in statuses:
        assert status["heldout_loss"] < status["initial_heldout_loss"] - MIN_LOSS_DROP, status
    assert_one_model({name: swarm.checkpoint(name) for name in names})


@pytest.mark.timeout(300)
def test_late_joiner_downloads_state_and_catches_up(swarm):
    epochs = 16  # the late joiner needs 20-25 s to start and sync here: the swarm must still be training then
    _, address = swarm.bootstrap()
    early = [swarm.trainer(name, [address], f"training.max_epochs={epochs}") for name in ("a", "b")]
    wait_for(lambda: swarm.epoch("a") >= 4, timeout=180, what="the swarm to reach epoch 4", alive=early)

    swarm.trainer("late", [address], f"training.max_epochs={epochs}")
    joined_at = swarm.epoch("a")
    # Training alone from scratch, the late peer would need 192 / 16 = 12 steps for each epoch it skips.
    synced = wait_for(lambda: (s := swarm.status("late")) and s["epoch"] >= joined_at and s,
                      timeout=120, what="the late joiner to reach the swarm's epoch")
    assert synced["steps"] < 12 * joined_at / 2, f"it trained its way there instead of downloading state: {synced}"

    for name in ("a", "b", "late"):
        assert swarm.processes[["bootstrap", "a", "b", "late"].index(name)].proc.wait(180) == 0
    assert {swarm.status(name)["epoch"] for name in ("a", "b", "late")} == {epochs}
    assert_one_model({name: swarm.checkpoint(name) for name in ("a", "b", "late")})


@pytest.mark.timeout(300)
def test_swarm_survives_a_killed_trainer_and_peers_leave_cleanly(swarm):
    _, address = swarm.bootstrap()
    # Alone, a's rounds wait for partners that are gone (c's record outlives it) until averaging_timeout,
    # then it steps on its own gradients: a short timeout only shortens that wait (20 s in debug.yaml).
    a, b, c = (swarm.trainer(name, [address], "averaging.averaging_timeout=5") for name in ("a", "b", "c"))
    wait_for(lambda: min(swarm.epoch(name) for name in "abc") >= 3, timeout=180,
             what="all trainers at epoch 3", alive=[a, b, c])

    c.kill_group()  # the machine of peer c dies: the peer, its DHT process and its p2pd at once
    killed_at = max(swarm.epoch("a"), swarm.epoch("b"))
    wait_for(lambda: min(swarm.epoch("a"), swarm.epoch("b")) >= killed_at + 3, timeout=150,
             what="the survivors to advance 3 epochs after the kill", alive=[a, b])

    b_members = b.group_members()
    assert len(b_members) >= 2, "expected the peer, its DHT process and p2pd in its process group"
    started = time.monotonic()
    b.signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0, b.log_tail()  # within the 30 s stop grace period the compose files give a peer
    print(f"b left {time.monotonic() - started:.1f}s after SIGTERM")
    wait_for(lambda: not b.group_members(), timeout=10, what="b's p2pd and helper processes to exit")
    assert swarm.status("b")["finished"]

    alone_at = swarm.epoch("a")
    wait_for(lambda: swarm.epoch("a") >= alone_at + 2, timeout=120, what="a to carry on alone", alive=[a])


@pytest.mark.timeout(240)
def test_peers_of_different_runs_never_train_together(swarm):
    _, address = swarm.bootstrap()
    runs = {"x": "run-x", "y": "run-y"}
    trainers = [swarm.trainer(name, [address], f"run_id={run}", "training.max_epochs=4", "training.finish_timeout=0")
                for name, run in runs.items()]
    wait_for(lambda: min(swarm.epoch(name) for name in runs) >= 2, timeout=180,
             what="both runs to train at once", alive=trainers)
    for name in runs:  # both alive and training on one DHT, yet each sees only itself
        assert swarm.status(name)["swarm_peers"] == 1
    for trainer in trainers:
        assert trainer.proc.wait(120) == 0, trainer.log_tail()
