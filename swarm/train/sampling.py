"""Sampling text from a ByteGPT, one byte at a time: temperature and top-k over the next-byte distribution."""

from __future__ import annotations

import torch

from swarm.train.model import VOCAB_SIZE, ByteGPT

# the defaults of `swarm generate`, also written to an export's generation_config.json
DEFAULT_TEMPERATURE, DEFAULT_TOP_K = 0.8, 40


@torch.inference_mode()
def generate(model: ByteGPT, prompt: bytes, *, max_new_bytes: int, temperature: float = DEFAULT_TEMPERATURE,
             top_k: int | None = DEFAULT_TOP_K, seed: int | None = None) -> bytes:
    """The prompt followed by ``max_new_bytes`` sampled bytes.

    :param prompt: at least one byte (a newline is a neutral start).
    :param temperature: divides the logits; below 1 sharpens the distribution, above 1 flattens it,
        0 takes the most likely byte every time (greedy, and then ``seed`` does not matter).
    :param top_k: sample among the ``top_k`` most likely bytes only; None (or 256) samples among all.
    :param seed: the same model, prompt, settings and seed give the same bytes (on the same device and
        torch build); None draws a fresh seed. The global torch RNG is neither used nor changed.

    The model sees at most the last ``model.config.seq_len`` bytes: its learned positions end there,
    so longer texts slide that window forward (and every step runs the whole window, without a cache).

    :raises ValueError: bad settings, an empty prompt, or logits that are not finite (a damaged model).
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one byte")
    if max_new_bytes < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need max_new_bytes >= 0, temperature >= 0 and top_k >= 1, got {max_new_bytes}, "
                         f"{temperature}, {top_k}")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    window = model.config.seq_len
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    for _ in range(max_new_bytes):
        logits = model(tokens[:, -window:])[0, -1].float()
        if temperature:
            logits = logits / temperature
        if not torch.isfinite(logits).all():  # finite but huge weights can overflow
            raise ValueError("the model's logits hold NaN or Inf; its weights are damaged or diverged")
        if temperature == 0:
            next_byte = logits.argmax().view(1)
        else:
            if top_k is not None and top_k < VOCAB_SIZE:
                kth_largest = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            next_byte = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, next_byte.view(1, 1)], dim=1)
    return bytes(tokens[0].tolist())
