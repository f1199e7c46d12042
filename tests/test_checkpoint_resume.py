"""Checkpoints: atomic writes, and a resume that restores exactly what was saved."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import CheckpointError
from swarm.train import checkpoint as ckpt

MODES = {
    "sync": ("averaging.mode=sync",),
    "diloco": ("averaging.mode=diloco", "diloco.inner_steps=5"),
    "sync-adamw8bit": ("averaging.mode=sync", "optimizer.name=adamw8bit"),  # bitsandbytes' 8-bit AdamW, on CPU here
}


@pytest.mark.swarm
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", MODES)
def test_resume_restores_model_optimizer_and_epoch(swarm, mode):
    # A lone trainer is a swarm of one: no initial peers, nothing to wait for.
    first = swarm.trainer("solo", [], "training.max_epochs=3", "checkpoint.every_epochs=1", *MODES[mode])
    assert first.proc.wait(150) == 0, first.log_tail()
    saved = swarm.status("solo")
    assert saved["epoch"] == 3 and saved["last_checkpoint_hash"]
    on_disk = torch.load(swarm.checkpoint("solo"), weights_only=True)
    assert on_disk["state_hash"] == saved["last_checkpoint_hash"] and on_disk["local_epoch"] == 3

    resumed = swarm.trainer("solo", [], "training.max_epochs=5", *MODES[mode], extra=("--resume",))
    assert resumed.proc.wait(150) == 0, resumed.log_tail()
    status = swarm.status("solo")
    assert status["resumed_state_hash"] == saved["last_checkpoint_hash"]
    assert (status["start_epoch"], status["epoch"]) == (3, 5), "it should continue from epoch 3, not start over"


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_resume_auto_starts_fresh_then_resumes(swarm):
    """What a container does (SWARM_CHECKPOINT_RESUME=auto): the same command on its first start and
    after every restart."""
    auto = "checkpoint.resume=auto"
    first = swarm.trainer("solo", [], auto, "training.max_epochs=1")
    assert first.proc.wait(150) == 0, first.log_tail()
    saved = swarm.status("solo")
    assert saved["start_epoch"] == 0 and saved["resumed_state_hash"] is None

    again = swarm.trainer("solo", [], auto, "training.max_epochs=2")
    assert again.proc.wait(150) == 0, again.log_tail()
    status = swarm.status("solo")
    assert status["resumed_state_hash"] == saved["last_checkpoint_hash"]
    assert (status["start_epoch"], status["epoch"]) == (1, 2)


def _tiny_checkpoint(value: float) -> ckpt.Checkpoint:
    model = {"w": torch.full((4,), value)}
    optimizer = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    return ckpt.Checkpoint(model=model, optimizer=optimizer, local_epoch=1, run_id="r", model_config={"d": 1},
                           state_hash=ckpt.state_hash(model, optimizer, 1))


@pytest.mark.timeout(30)
def test_crash_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _tiny_checkpoint(1.0))

    def crash_after_partial_write(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_after_partial_write)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, _tiny_checkpoint(2.0))
    monkeypatch.undo()
    restored = ckpt.load_checkpoint(tmp_path, run_id="r", model_config={"d": 1})
    assert torch.equal(restored.model["w"], torch.full((4,), 1.0))
    assert [path.name for path in tmp_path.iterdir()] == ["latest.pt"], "the temporary file must be removed"


@pytest.mark.timeout(30)
def test_checkpoint_of_another_run_or_model_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path, _tiny_checkpoint(1.0))
    with pytest.raises(CheckpointError, match="belongs to run"):
        ckpt.load_checkpoint(tmp_path, run_id="other", model_config={"d": 1})
    with pytest.raises(CheckpointError, match="was made for model"):
        ckpt.load_checkpoint(tmp_path, run_id="r", model_config={"d": 2})


@pytest.mark.timeout(30)
def test_state_hash_sees_every_tensor():
    base = _tiny_checkpoint(1.0)
    changed_optimizer = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": base.optimizer["param_groups"]}
    assert ckpt.state_hash(base.model, base.optimizer, 1) == base.state_hash
    assert ckpt.state_hash(base.model, changed_optimizer, 1) != base.state_hash
    assert ckpt.state_hash(base.model, base.optimizer, 2) != base.state_hash
    assert ckpt.state_hash({"w": torch.full((4,), 1.0 + 1e-7)}, base.optimizer, 1) != base.state_hash
