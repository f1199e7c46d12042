"""Local text data: the embedded default corpus or a folder of the user's own files.

Text is read as raw bytes (the model is byte-level). Files are split deterministically into a
held-out set (the same on every peer that reads the same folder, so held-out losses compare) and
training shards. Nothing here talks to the network: a peer's samples never leave it.
"""

from __future__ import annotations

import random
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from swarm.config.schema import DataConfig
from swarm.errors import DataError

_SNIFF_BYTES = 4096  # a NUL byte in the first few KB marks a file as binary


def default_corpus_root() -> Path:
    """The Python standard library's own sources: real text that exists on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class TextDataset:
    """Training and held-out bytes of this peer, as uint8 tensors."""

    train: torch.Tensor
    heldout: torch.Tensor
    num_train_files: int
    num_heldout_files: int
    source: str

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of seq_len + 1 bytes: (inputs, next-byte targets), both int64."""
        return _windows(self.train, batch_size, seq_len, generator)

    def heldout_batches(self, num_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of held-out windows (same seed on every peer)."""
        generator = torch.Generator().manual_seed(1234)
        return [_windows(self.heldout, batch_size, seq_len, generator) for _ in range(num_batches)]


def load_dataset(config: DataConfig, seq_len: int) -> TextDataset:
    """Read this peer's shard and the held-out files.

    :raises DataError: the folder is missing or holds too little text for one window of seq_len.
    """
    root = default_corpus_root() if config.path is None else Path(config.path).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist (data.path)")
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder")
    pattern = "*.py" if config.path is None else "*"
    files = sorted(path for path in root.rglob(pattern) if path.is_file() and "site-packages" not in path.parts)
    if not files:
        raise DataError(f"data folder {root} holds no files")

    heldout_files, train_files = [], []
    for path in files:
        bucket = zlib.crc32(str(path.relative_to(root)).encode()) % 10_000
        (heldout_files if bucket < config.heldout_fraction * 10_000 else train_files).append(path)
    if not heldout_files or not train_files:  # tiny folders: keep one file aside for evaluation
        heldout_files, train_files = files[-1:], files[:-1] or files[-1:]
    train_files = train_files[config.shard_index :: config.num_shards] or train_files

    random.Random(config.shard_index).shuffle(train_files)
    train = _read_text(train_files, config.max_bytes)
    heldout = _read_text(heldout_files, max(int(config.max_bytes * config.heldout_fraction), 1 << 20))
    for name, data in (("training", train), ("held-out", heldout)):
        if data.numel() <= seq_len + 1:
            raise DataError(
                f"data folder {root} has too little readable text for {name} "
                f"({data.numel()} bytes; need more than model.seq_len + 1 = {seq_len + 1})"
            )
    return TextDataset(train, heldout, len(train_files), len(heldout_files), source=str(root))


def _read_text(paths: list[Path], max_bytes: int) -> torch.Tensor:
    chunks, total = [], 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue  # unreadable file (permissions, vanished): skip it, the rest is still usable
        if b"\0" in data[:_SNIFF_BYTES]:
            continue
        data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    joined = b"\n".join(chunks)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)


def _windows(data: torch.Tensor, batch_size: int, seq_len: int, generator: Optional[torch.Generator]):
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = data[starts[:, None] + offsets[None, :]].long()
    return windows[:, :-1], windows[:, 1:]
