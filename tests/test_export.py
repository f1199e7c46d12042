"""`swarm export` and `swarm generate`: the trained model used outside swarm.

transformers loads an export as a plain GPT2LMHeadModel and computes swarm's logits (within 1e-5;
measured: identical with its default SDPA attention, up to 3e-6 with eager attention); generating
from a checkpoint and from its export gives the same text; bad input ends in one line and its exit code.
transformers and safetensors come with the `test` extra (through `export`), so they are imported here
unconditionally: a missing extra fails these tests rather than skipping them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from conftest import DEBUG_CONFIG, run_cli
from peers import cli, exit_codes
from swarm.config.loading import load_config
from swarm.train import checkpoint as ckpt
from swarm.train.export import (
    MATCH_TOLERANCE,
    export_checkpoint,
    from_gpt2,
    gpt2_config,
    load_checkpoint_model,
    load_export_model,
    to_gpt2,
)
from swarm.train.model import ByteGPT
from swarm.train.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, generate
from test_bad_input import assert_one_clear_line

MODEL = load_config(DEBUG_CONFIG, environ={}).model
RUN_ID = "export-test"


def save(directory: Path, model: ByteGPT, epoch: int = 3) -> Path:
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return ckpt.save_checkpoint(directory, ckpt.Checkpoint(
        model=state, optimizer={}, local_epoch=epoch, run_id=RUN_ID, model_config=MODEL.model_dump(),
        state_hash=ckpt.state_hash(state, {}, epoch)))


def train(model: ByteGPT, steps: int) -> float:
    """A few AdamW steps on real text (a standard-library source file), so that logits are far from uniform."""
    data = torch.tensor(list(Path(os.__file__).read_bytes()), dtype=torch.long)
    generator, length = torch.Generator().manual_seed(0), MODEL.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (8,), generator=generator)
        batch = torch.stack([data[start:start + length + 1] for start in starts])
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As the debug config's training.threads, which the commands below get too: on 2 busy cores torch's
    default of 2 threads made sampling 60 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the debug model: as initialised, and after 40 training steps."""
    torch.manual_seed(0)
    fresh, trained = ByteGPT(MODEL), ByteGPT(MODEL)
    assert train(trained, 40) < 3.5  # from ln 256 = 5.5: it learned something
    root = tmp_path_factory.mktemp("checkpoints")
    return {"random-init": save(root / "random-init", fresh), "trained": save(root / "trained", trained)}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> Path:
    """The trained checkpoint exported through the real CLI."""
    out = tmp_path_factory.mktemp("exports") / "trained"
    result = run_cli("export", "--config", str(DEBUG_CONFIG), "--checkpoint", str(models["trained"]), "--out", str(out),
                     timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"written to {out}" in result.stdout and "matches swarm's logits" in result.stdout
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                           "model.safetensors"]
    return out


def test_mapping_is_gpt2s_layout_and_round_trips_bit_for_bit():
    model = ByteGPT(MODEL)
    theirs = to_gpt2(model.state_dict(), MODEL.n_layers)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2_config(MODEL))).state_dict()
    assert {name: tuple(t.shape) for name, t in theirs.items()} == {
        name: tuple(t.shape) for name, t in reference.items()}, "transformers' GPT-2 renamed or reshaped a tensor"
    back = from_gpt2(theirs, MODEL.n_layers)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("which", ["random-init", "trained"])
def test_transformers_computes_swarm_logits(models, tmp_path, which, attention):
    out = tmp_path / "export"
    info = export_checkpoint(models[which], out)
    assert info.run_id == RUN_ID and info.local_epoch == 3 and info.max_logit_diff <= MATCH_TOLERANCE
    ours, _ = load_checkpoint_model(models[which])
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation=attention).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel" and theirs.config.vocab_size == 256
    tokens = torch.randint(0, 256, (3, MODEL.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for length in (MODEL.seq_len, 5, 1):  # the full context, and shorter prefixes
            diff = (theirs(tokens[:, :length]).logits - ours(tokens[:, :length])).abs().max().item()
            assert diff <= 1e-5, f"{which}, {attention}, length {length}: logits differ by {diff:.2e}"


@pytest.mark.timeout(120)
def test_transformers_generate_matches_swarm_greedy(models, exported):
    """transformers' own generate (with its key-value cache) continues the text as swarm does."""
    ours, _ = load_checkpoint_model(models["trained"])
    theirs = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    prompt = b"def "
    new = MODEL.seq_len - len(prompt)  # transformers' generate cannot go past the learned positions
    expected = generate(ours, prompt, max_new_bytes=new, temperature=0)
    with torch.inference_mode():
        out = theirs.generate(torch.tensor([list(prompt)]), max_new_tokens=new, do_sample=False)
    assert bytes(out[0].tolist()) == expected


@pytest.mark.timeout(120)
def test_generate_gives_the_same_text_from_checkpoint_and_export(models, exported):
    args = ("--config", str(DEBUG_CONFIG), "--prompt", "def ", "--max-new-bytes", "120", "--temperature", "0.8",
            "--top-k", "40", "--seed", "0")
    from_checkpoint = run_cli("generate", "--checkpoint", str(models["trained"]), *args, timeout=60)
    from_export = run_cli("generate", "--export", str(exported), *args, timeout=60)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr[-2000:]
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    assert from_checkpoint.stdout == from_export.stdout
    assert from_checkpoint.stdout.startswith("def ") and len(from_checkpoint.stdout.encode()) >= 120


def test_sampling_settings(models):
    model, _ = load_checkpoint_model(models["trained"])
    prompt, length = b"import ", 2 * MODEL.seq_len  # past the context: the window slides
    first = generate(model, prompt, max_new_bytes=length, seed=0)
    assert len(first) == len(prompt) + length and first.startswith(prompt)
    assert generate(model, prompt, max_new_bytes=length, seed=0) == first
    assert generate(model, prompt, max_new_bytes=length, seed=1) != first
    greedy = generate(model, prompt, max_new_bytes=length, temperature=0, seed=0)
    assert generate(model, prompt, max_new_bytes=length, temperature=0, seed=1) == greedy
    assert generate(model, prompt, max_new_bytes=length, top_k=1, seed=2) == greedy
    before = torch.random.get_rng_state()
    generate(model, prompt, max_new_bytes=8, seed=3, top_k=None)
    assert torch.equal(torch.random.get_rng_state(), before), "sampling must not touch the global RNG"


def test_generate_help_states_the_librarys_defaults():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    helps = {action.dest: action.help for action in commands["generate"]._actions}
    assert f"(default {DEFAULT_TEMPERATURE})" in helps["temperature"] and f"(default {DEFAULT_TOP_K})" in helps["top_k"]


def swarm(capsys, *args: str) -> SimpleNamespace:
    """The `swarm` command in this process (the bad-input cases: no torch import to wait for)."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


@pytest.mark.parametrize("content, fragment", [
    (None, "no checkpoint at"),
    (b"half a checkpoint", "is corrupt or truncated"),
    ("not swarm's", "is not a swarm checkpoint"),
])
@pytest.mark.parametrize("command", ["export", "generate"])
def test_unusable_checkpoint(capsys, tmp_path, command, content, fragment):
    path = tmp_path / "latest.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save({"model": {}}, path)
    extra = ("--out", str(tmp_path / "out")) if command == "export" else ()
    result = swarm(capsys, command, "--checkpoint", str(path), *extra)
    assert_one_clear_line(result, exit_codes.CHECKPOINT, str(path), fragment)
    assert not (tmp_path / "out").exists()


def test_checkpoint_whose_tensors_do_not_fit_its_model(capsys, tmp_path):
    model = ByteGPT(MODEL)
    state = model.state_dict()
    state["head.weight"] = state["head.weight"][:, :7]
    ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint(model=state, optimizer={}, local_epoch=1, run_id=RUN_ID,
                                                   model_config=MODEL.model_dump(), state_hash="-"))
    result = swarm(capsys, "generate", "--checkpoint", str(tmp_path))
    assert_one_clear_line(result, exit_codes.CHECKPOINT, "do not fit", "head.weight")


def test_default_checkpoint_is_the_configs(capsys, tmp_path):
    result = swarm(capsys, "generate", "--config", str(DEBUG_CONFIG), "--set", f"checkpoint.dir={tmp_path / 'none'}")
    assert_one_clear_line(result, exit_codes.CHECKPOINT, str(tmp_path / "none"))
    result = swarm(capsys, "generate", "--set", "checkpoint=null")
    assert_one_clear_line(result, exit_codes.USAGE, "--checkpoint")


def test_export_never_overwrites(capsys, models, exported):
    before = {path.name: path.stat().st_mtime_ns for path in exported.iterdir()}
    result = swarm(capsys, "export", "--checkpoint", str(models["trained"]), "--out", str(exported))
    assert_one_clear_line(result, exit_codes.EXPORT, str(exported), "already exists")
    assert {path.name: path.stat().st_mtime_ns for path in exported.iterdir()} == before


def _copy_export(exported: Path, to: Path) -> Path:
    to.mkdir()
    for path in exported.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


@pytest.mark.parametrize("damage, fragment", [
    ("missing folder", "no export folder"),
    ("no config.json", "config.json is missing"),
    ("corrupt weights", "unreadable"),
    ("vocabulary of 50257", "vocab_size is 50257"),
    ("tanh GELU", "activation_function is 'gelu_new'"),
    ("tensor missing", "has no tensor"),
])
def test_unusable_export(capsys, tmp_path, exported, damage, fragment):
    import json

    import safetensors.torch

    folder = tmp_path / "export" if damage == "missing folder" else _copy_export(exported, tmp_path / "export")
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if damage == "no config.json":
        config_path.unlink()
    elif damage == "corrupt weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage in ("vocabulary of 50257", "tanh GELU"):
        config = json.loads(config_path.read_text())
        config.update({"vocab_size": 50257} if damage == "vocabulary of 50257" else {"activation_function": "gelu_new"})
        config_path.write_text(json.dumps(config))
    elif damage == "tensor missing":
        tensors = safetensors.torch.load_file(weights)
        del tensors["transformer.h.1.attn.c_attn.weight"]
        safetensors.torch.save_file(tensors, weights)
    result = swarm(capsys, "generate", "--export", str(folder))
    assert_one_clear_line(result, exit_codes.EXPORT, fragment)


def test_damaged_files_are_refused_or_usable(tmp_path):
    """Truncated and byte-flipped checkpoints and exports (of a tiny model): each either loads into a model
    that samples, or is refused with swarm's error; nothing else escapes (a fuzz test, fixed seed)."""
    import random
    import warnings

    from swarm.config.schema import ModelConfig
    from swarm.errors import SwarmError

    config = ModelConfig(seq_len=8, d_model=8, n_layers=1, n_heads=1)
    ckpt.save_checkpoint(tmp_path / "ck", ckpt.Checkpoint(
        model=ByteGPT(config).state_dict(), optimizer={"state": {}, "param_groups": [{"lr": 0.1}]}, local_epoch=1,
        run_id=RUN_ID, model_config=config.model_dump(), state_hash="-"))
    export_checkpoint(tmp_path / "ck", tmp_path / "export")
    rng, outcomes = random.Random(0), {"refused": 0, "usable": 0}
    for path, load in ((tmp_path / "ck" / "latest.pt", load_checkpoint_model),
                       (tmp_path / "export" / "model.safetensors", lambda _: load_export_model(tmp_path / "export")),
                       (tmp_path / "export" / "config.json", lambda _: load_export_model(tmp_path / "export"))):
        intact = path.read_bytes()
        for trial in range(300):
            damaged = bytearray(intact[:rng.randrange(len(intact))] if trial % 2 else intact)
            for _ in range(0 if trial % 2 else rng.randrange(1, 6)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path.write_bytes(bytes(damaged))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch warns about the odd pickle protocols it reads
                    model, _ = load(path)
                generate(model, b"a", max_new_bytes=2, seed=0)
                outcomes["usable"] += 1
            except SwarmError:
                outcomes["refused"] += 1
            except ValueError as e:  # finite but huge weights: `swarm generate` reports it as the file's error
                assert "NaN or Inf" in str(e)
                outcomes["refused"] += 1
        path.write_bytes(intact)
    assert outcomes["refused"] > 500, outcomes


@pytest.mark.parametrize("command", ["export", "generate"])
def test_missing_extra_names_the_install_line(capsys, monkeypatch, tmp_path, models, exported, command):
    for module in ("safetensors", "safetensors.torch", "transformers"):
        monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is not installed
    args = (["--checkpoint", str(models["trained"]), "--out", str(tmp_path / "out")] if command == "export"
            else ["--export", str(exported)])
    result = swarm(capsys, command, *args)
    assert_one_clear_line(result, exit_codes.EXPORT, "safetensors is not installed", "pip install", "[export]")
    assert not (tmp_path / "out").exists()
    # a checkpoint needs neither
    assert swarm(capsys, "generate", "--checkpoint", str(models["trained"]), "--max-new-bytes", "4").returncode == 0


@pytest.mark.timeout(60)
def test_bad_input_through_the_real_command(tmp_path):
    """The same line and code from a real process, without a traceback; bad flags are usage errors."""
    result = run_cli("export", "--checkpoint", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "out"))
    assert_one_clear_line(result, exit_codes.CHECKPOINT, "no checkpoint at")
    for flags in (["--temperature", "-1"], ["--top-k", "many"], ["--checkpoint", "a", "--export", "b"]):
        result = run_cli("generate", *flags)
        assert result.returncode == exit_codes.USAGE and "Traceback" not in result.stderr, (flags, result.stderr)
