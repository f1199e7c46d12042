"""A small byte-level GPT: bytes in, next-byte logits out. No tokenizer, nothing to download."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationError

from swarm.config.schema import ModelConfig

VOCAB_SIZE = 256  # one token per byte


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = config.n_heads, config.dropout
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln_2(x))


class ByteGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.d_model)
        self.position_embedding = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, VOCAB_SIZE, bias=False)
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def validate_model_config(model_config: dict) -> ModelConfig:
    """:raises ValueError: one line naming every problem (a file's model config, not the user's config tree)."""
    try:
        return ModelConfig.model_validate(model_config)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'model'}: {item['msg']}" for item in e.errors())
        raise ValueError(f"invalid model config {model_config!r} ({problems})") from None


def restore_model(model_config: dict, state: dict[str, torch.Tensor]) -> ByteGPT:
    """A ByteGPT in eval mode holding ``state``, for inference (export, generation).

    :raises ValueError: ``model_config`` is not a valid model section, or ``state`` does not fit it
        (missing, extra or misshapen tensors) or holds NaN or Inf; the message is one line.
    """
    config = validate_model_config(model_config)
    if not isinstance(state, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in state.values()):
        raise ValueError("its model state is not a dict of tensors")
    model = ByteGPT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"its tensors do not fit a ByteGPT of {model_config} ({reason})") from None
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"its tensor {name} holds NaN or Inf")
    return model.eval()


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
