"""The trained model outside swarm: a checkpoint exported as a Hugging Face GPT-2, and read back.

ByteGPT is GPT-2's architecture with the 256 byte values as its vocabulary: pre-LayerNorm blocks
(eps 1e-5), one fused q|k|v projection split in that order, learned positions, exact (erf) GELU,
causal attention scaled by 1/sqrt(head_dim), and an output head without bias, not tied to the
embedding. An export is therefore a renaming plus one transpose per linear layer of a block (GPT-2
keeps those as ``Conv1D``, whose weight is ``nn.Linear``'s transposed). Nothing is approximated:
``transformers.GPT2LMHeadModel`` computes swarm's logits up to float32 rounding, and every export
is checked against swarm's own model before it is published.

An export folder holds ``model.safetensors`` (float32, GPT-2's tensor names; its metadata names the
run, epoch and state hash of the checkpoint), ``config.json`` (a ``GPT2Config``),
``generation_config.json`` (``swarm generate``'s defaults) and a ``README.md`` model card. There is
no tokenizer: a text's input ids are its UTF-8 bytes.

safetensors and transformers are the optional ``export`` extra; they are imported here only when
a function needs them, so the rest of swarm runs without them.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarm.config.schema import ModelConfig
from swarm.errors import CheckpointError, ExportError
from swarm.train.checkpoint import Checkpoint, read_checkpoint
from swarm.train.model import VOCAB_SIZE, ByteGPT, restore_model, validate_model_config
from swarm.train.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_K

WEIGHTS, CONFIG, GENERATION_CONFIG, CARD = "model.safetensors", "config.json", "generation_config.json", "README.md"
INSTALL_HINT = "pip install 'swarm[export]' (in a clone of swarm: pip install -c constraints.txt -e '.[export]')"
# The largest difference allowed between transformers' logits and swarm's on the check before publishing.
# Measured: none with transformers' default (SDPA) attention, which runs the same kernels as ByteGPT;
# up to 3e-6 with its eager attention (float32 rounding in another order), on trained debug and default models.
MATCH_TOLERANCE = 1e-5

# (ByteGPT's name, GPT-2's name, whether the weight is transposed) for one block
_BLOCK = [
    ("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
    ("qkv.weight", "attn.c_attn.weight", True), ("qkv.bias", "attn.c_attn.bias", False),
    ("proj.weight", "attn.c_proj.weight", True), ("proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
    ("mlp.0.weight", "mlp.c_fc.weight", True), ("mlp.0.bias", "mlp.c_fc.bias", False),
    ("mlp.2.weight", "mlp.c_proj.weight", True), ("mlp.2.bias", "mlp.c_proj.bias", False),
]
_OUTSIDE_BLOCKS = [
    ("token_embedding.weight", "transformer.wte.weight", False),
    ("position_embedding.weight", "transformer.wpe.weight", False),
    ("ln_f.weight", "transformer.ln_f.weight", False), ("ln_f.bias", "transformer.ln_f.bias", False),
    ("head.weight", "lm_head.weight", False),  # lm_head is an nn.Linear in GPT-2 too
]
# What config.json must say (or leave to GPT2Config's default, the second value) for ByteGPT to run it
_GPT2_REQUIRED = {
    "model_type": ("gpt2", None), "vocab_size": (VOCAB_SIZE, 50257), "activation_function": ("gelu", "gelu_new"),
    "layer_norm_epsilon": (1e-5, 1e-5), "scale_attn_weights": (True, True),
    "scale_attn_by_inverse_layer_idx": (False, False), "tie_word_embeddings": (False, True),
    "add_cross_attention": (False, False),
}


@dataclass
class ExportInfo:
    """Where an export's weights came from; ``None`` where the export does not say (not written by swarm)."""

    run_id: str | None
    local_epoch: int | None
    state_hash: str | None
    weights_bytes: int
    max_logit_diff: float | None = None  # transformers' logits against swarm's, when export checked them


def _names(n_layers: int) -> Iterator[tuple[str, str, bool]]:
    yield from _OUTSIDE_BLOCKS
    for index in range(n_layers):
        for ours, theirs, transposed in _BLOCK:
            yield f"blocks.{index}.{ours}", f"transformer.h.{index}.{theirs}", transposed


def to_gpt2(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """ByteGPT's state dict under GPT-2's names and layouts (new contiguous tensors)."""
    return {theirs: (state[ours].t() if transposed else state[ours]).contiguous().clone()
            for ours, theirs, transposed in _names(n_layers)}


def from_gpt2(tensors: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_gpt2`. :raises KeyError: naming a tensor GPT-2 should have and does not."""
    return {ours: (tensors[theirs].t() if transposed else tensors[theirs]).contiguous()
            for ours, theirs, transposed in _names(n_layers)}


def gpt2_config(model: ModelConfig) -> dict[str, Any]:
    """config.json: the ``GPT2Config`` of the same network. GPT-2 applies ``resid_pdrop`` after attention
    as well as after the MLP and ``embd_pdrop`` to the embeddings, where ByteGPT drops out only in
    attention and after the MLP; this matters only to whoever trains the export further with dropout."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "dtype": "float32",
        "vocab_size": VOCAB_SIZE, "n_positions": model.seq_len, "n_embd": model.d_model, "n_layer": model.n_layers,
        "n_head": model.n_heads, "n_inner": 4 * model.d_model, "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": False,
        "resid_pdrop": model.dropout, "attn_pdrop": model.dropout, "embd_pdrop": 0.0,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def load_checkpoint_model(path: Path) -> tuple[ByteGPT, Checkpoint]:
    """The model of a swarm checkpoint (a file, or a folder holding latest.pt), in eval mode.

    :raises CheckpointError: missing, corrupt, not a swarm checkpoint, or its tensors do not fit its model config.
    """
    checkpoint = read_checkpoint(path)
    try:
        return restore_model(checkpoint.model_config, checkpoint.model), checkpoint
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def export_checkpoint(checkpoint_path: Path, out: Path) -> ExportInfo:
    """Write the model of a checkpoint to the new folder ``out`` as a Hugging Face GPT-2, after checking
    that transformers computes the same logits. ``out`` appears complete or not at all.

    :raises CheckpointError: the checkpoint cannot be read or restored.
    :raises ExportError: ``out`` exists and is not an empty folder, the ``export`` extra is missing, or
        transformers' logits differ from swarm's by more than MATCH_TOLERANCE (nothing is written then).
    """
    safetensors_torch = _require("safetensors.torch")
    _require("transformers")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"{out} already exists; choose another --out or remove it")
    model, checkpoint = load_checkpoint_model(checkpoint_path)
    info = ExportInfo(checkpoint.run_id, checkpoint.local_epoch, checkpoint.state_hash, weights_bytes=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        metadata = {"format": "pt", "swarm_run_id": info.run_id, "swarm_local_epoch": str(info.local_epoch),
                    "swarm_state_hash": info.state_hash}
        safetensors_torch.save_file(to_gpt2(model.state_dict(), model.config.n_layers), staging / WEIGHTS,
                                    metadata=metadata)
        _write_json(staging / CONFIG, gpt2_config(model.config))
        _write_json(staging / GENERATION_CONFIG, {"do_sample": True, "temperature": DEFAULT_TEMPERATURE,
                                                  "top_k": DEFAULT_TOP_K, "bos_token_id": None, "eos_token_id": None})
        info.weights_bytes = (staging / WEIGHTS).stat().st_size
        (staging / CARD).write_text(_model_card(model, info))
        # safetensors writes its file readable by the owner only; give it the mode (umask) of the others
        os.chmod(staging / WEIGHTS, (staging / CARD).stat().st_mode)
        info.max_logit_diff = max_logit_diff(staging, model)
        if not info.max_logit_diff <= MATCH_TOLERANCE:
            raise ExportError(f"transformers {_version('transformers')} computes logits up to "
                              f"{info.max_logit_diff:.2e} away from swarm's (allowed {MATCH_TOLERANCE:g}); "
                              f"nothing was written to {out}")
        os.replace(staging, out)  # rename(2) also replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def max_logit_diff(directory: Path, model: ByteGPT, *, batch: int = 2, seed: int = 0) -> float:
    """Load ``directory`` with transformers' GPT2LMHeadModel; the largest absolute difference between its
    logits and ``model``'s on ``batch`` random byte sequences of the model's full context length."""
    transformers = _require("transformers")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    tokens = torch.randint(0, VOCAB_SIZE, (batch, model.config.seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return (hf_model(tokens).logits - model(tokens)).abs().max().item()


def load_export_model(directory: Path) -> tuple[ByteGPT, ExportInfo]:
    """The model of an export folder (swarm's, or any GPT-2 that ByteGPT can express), in eval mode.
    Needs safetensors only, not transformers.

    :raises ExportError: the folder or a file is missing or corrupt, or config.json describes a model
        ByteGPT cannot run.
    """
    safetensors = _require("safetensors")
    safetensors_torch = _require("safetensors.torch")
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"no export folder at {directory}")
    config = _read_gpt2_config(directory / CONFIG)
    weights = directory / WEIGHTS
    try:
        tensors = safetensors_torch.load_file(weights)
        with safetensors.safe_open(weights, framework="pt") as file:
            metadata = file.metadata() or {}
        state = from_gpt2(tensors, config["n_layers"])
        model = restore_model(config, state)
    except FileNotFoundError:
        raise ExportError(f"{weights} is missing") from None
    except KeyError as e:
        raise ExportError(f"{weights} has no tensor {e}; it is not the GPT-2 its config.json describes") from None
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as e:
        raise ExportError(f"{weights} is unreadable or does not fit config.json ({_one_line(e)})") from None
    epoch = metadata.get("swarm_local_epoch")
    info = ExportInfo(metadata.get("swarm_run_id"), int(epoch) if epoch and epoch.isdigit() else None,
                      metadata.get("swarm_state_hash"), weights_bytes=weights.stat().st_size)
    return model, info


def _read_gpt2_config(path: Path) -> dict[str, Any]:
    """ByteGPT's model config from a GPT-2 config.json, or ExportError naming the setting ByteGPT lacks."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} is missing; is {path.parent} an export?") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is not readable JSON ({_one_line(e)})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path} is not a model config")
    for key, (required, default) in _GPT2_REQUIRED.items():
        if config.get(key, default) != required:
            raise ExportError(f"{path} describes a model swarm cannot run: {key} is {config.get(key, default)!r}, "
                              f"swarm's byte-level GPT needs {required!r}")
    try:  # the defaults are GPT2Config's
        model = validate_model_config({
            "seq_len": config.get("n_positions", 1024), "d_model": config.get("n_embd", 768),
            "n_layers": config.get("n_layer", 12), "n_heads": config.get("n_head", 12),
            "dropout": config.get("attn_pdrop", 0.1)})
    except ValueError as e:
        raise ExportError(f"{path} describes a model swarm cannot run: {e}") from None
    if config.get("n_inner") not in (None, 4 * model.d_model):
        raise ExportError(f"{path}: n_inner is {config['n_inner']!r}, swarm's byte-level GPT needs 4 * n_embd "
                          f"({4 * model.d_model})")
    return model.model_dump()


def _model_card(model: ByteGPT, info: ExportInfo) -> str:
    config = model.config
    return f"""# {info.run_id}: a byte-level GPT trained with swarm

Exported by swarm from the checkpoint of run `{info.run_id}` at epoch {info.local_epoch}
(state hash `{info.state_hash}`).

A GPT-2 (`GPT2LMHeadModel`) whose vocabulary is the 256 byte values: {model.num_parameters():,} parameters,
{config.n_layers} layers, width {config.d_model}, {config.n_heads} heads, context {config.seq_len} bytes.
There is no tokenizer: the input ids of a text are its UTF-8 bytes.

```python
import torch
from transformers import GPT2LMHeadModel

model = GPT2LMHeadModel.from_pretrained("path/to/this/folder").eval()
ids = torch.tensor([list("def ".encode())])
out = model.generate(ids, max_new_tokens={config.seq_len - 4}, do_sample=True, top_k=40, temperature=0.8)
print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
```

Prompt and new bytes together must fit the context of {config.seq_len} bytes (the learned positions end
there). `swarm generate --export path/to/this/folder --prompt "def "` samples beyond it, keeping the
last {config.seq_len} bytes as context.
"""


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _require(module: str):
    """Import a module of the optional ``export`` extra, or raise ExportError with the install line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module.split('.')[0]} is not installed; exports need the optional extra: "
                          f"{INSTALL_HINT}") from None


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__
