"""What fits this machine (swarm.train.fit): the batch size chosen from measured memory and step time,
and bfloat16 autocast; on the CPU here, and on CUDA where there is one."""

from __future__ import annotations

import pytest
import torch

from swarm.config.loading import load_config
from swarm.config.schema import ModelConfig
from swarm.errors import ConfigError
from swarm.train import fit
from swarm.train.model import ByteGPT

pytestmark = pytest.mark.timeout(300)

TINY = ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=2)


def _build(device, config=TINY):
    def build():
        model = ByteGPT(config).to(device)
        return model, torch.optim.AdamW(model.parameters())
    return build


def test_batch_size_auto_is_the_default_and_is_checked():
    assert load_config(None).training.batch_size == "auto"
    assert load_config(None, ["training.batch_size=8"]).training.batch_size == 8
    for bad in ("0", "lots"):
        with pytest.raises(ConfigError, match="batch_size"):
            load_config(None, [f"training.batch_size={bad}"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["training.precision=fp8"])


def test_cpu_batch_is_a_power_of_two_bounded_by_memory_and_step_time(monkeypatch):
    device = torch.device("cpu")
    cost = fit.choose_batch_size(_build(device), seq_len=TINY.seq_len, device=device)
    assert cost.batch_size in (1, 2, 4, 8, 16, 32, 64) and cost.seconds > 0 and cost.peak_bytes > 0
    # with almost no free memory the batch shrinks to what fits, down to one
    monkeypatch.setattr(fit, "free_memory", lambda device: 16 * 30_000 + 3 * fit.activation_bytes(TINY))
    assert fit.choose_batch_size(_build(device), seq_len=TINY.seq_len, device=device).batch_size <= 2
    monkeypatch.setattr(fit, "free_memory", lambda device: 0)
    assert fit.choose_batch_size(_build(device), seq_len=TINY.seq_len, device=device).batch_size == 1


def test_activation_estimate_grows_with_the_model():
    small, longer = fit.activation_bytes(TINY), fit.activation_bytes(TINY.model_copy(update={"seq_len": 64}))
    wider = fit.activation_bytes(TINY.model_copy(update={"d_model": 64}))
    assert longer > 2 * small and wider > small


def test_bf16_autocast_trains_and_keeps_fp32_parameters():
    device = torch.device("cpu")
    assert fit.resolve_precision("auto", device) == "fp32" and fit.resolve_precision("bf16", device) == "bf16"
    model, optimizer = _build(device)()
    tokens = torch.randint(0, 256, (4, TINY.seq_len + 1))
    with fit.autocast(device, "bf16"):
        logits = model(tokens[:, :-1])
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    cost = fit.measure_step(model, optimizer, batch_size=4, seq_len=TINY.seq_len, device=device, precision="bf16")
    assert cost.seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_fits_and_bf16_where_supported():
    device = torch.device("cuda")
    model_config = ModelConfig(seq_len=256, d_model=384, n_layers=6, n_heads=6)
    precision = fit.resolve_precision("auto", device)
    assert precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    cost = fit.choose_batch_size(_build(device, model_config), seq_len=256, device=device, precision=precision)
    assert cost.batch_size >= 1 and cost.peak_bytes <= fit.HEADROOM * torch.cuda.mem_get_info(device)[1]
