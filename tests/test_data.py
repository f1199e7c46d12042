"""Local data: the embedded corpus by default, a user's folder otherwise; shards and a fixed held-out set."""

from __future__ import annotations

import torch

from swarm.config.schema import DataConfig
from swarm.train.data import load_dataset


def test_embedded_corpus_is_the_stdlib_and_shards_differ():
    first = load_dataset(DataConfig(num_shards=2, shard_index=0, max_bytes=2_000_000), seq_len=64)
    second = load_dataset(DataConfig(num_shards=2, shard_index=1, max_bytes=2_000_000), seq_len=64)
    assert first.train.numel() > 1_000_000 and "python3" in first.source
    assert not torch.equal(first.train[:10_000], second.train[:10_000])
    assert torch.equal(first.heldout, second.heldout), "held-out text must be the same on every peer"


def test_user_folder_with_text_and_binary_files(tmp_path):
    for index in range(20):
        (tmp_path / f"doc{index}.txt").write_text(f"document {index}: " + "some private text. " * 50)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0\0" + bytes(range(256)) * 4)
    dataset = load_dataset(DataConfig(path=tmp_path), seq_len=32)
    assert dataset.num_train_files + dataset.num_heldout_files == 21
    assert b"\x89PNG" not in bytes(dataset.train.tolist()) + bytes(dataset.heldout.tolist())
    inputs, targets = dataset.sample_batch(4, 32, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (4, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_heldout_batches_are_fixed(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 100)
    (tmp_path / "b.txt").write_text("0123456789" * 100)
    dataset = load_dataset(DataConfig(path=tmp_path), seq_len=16)
    first, second = dataset.heldout_batches(2, 4, 16), dataset.heldout_batches(2, 4, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
