"""The Makefile's torch choice: `TORCH=cpu` (the default, what CI uses) or a CUDA build, installed from
PyTorch's own wheel index at the version constraints.txt pins; a changed choice reinstalls torch.

These run the real `make` with `-n` (print the commands, run none): nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

PINNED = re.search(r"^torch==([0-9.]+)$", (REPO / "constraints.txt").read_text(), flags=re.MULTILINE).group(1)


def make(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("TORCH", "TORCH_INDEX_URL", "MAKEFLAGS")}
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def torch_install(output: str) -> str:
    """The pip command of the recipe that installs torch (joined across its continuation line)."""
    joined = output.replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if "pip install" in line and "'torch==" in line]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", ["install", "demo", "test", "test-fast"])
def test_cpu_build_by_default(target):
    shown = make("-B", target)
    assert shown.returncode == 0, shown.stderr
    command = torch_install(shown.stdout)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu " in command
    assert f"'torch=={PINNED}+cpu'" in command
    assert "-c constraints.txt" in command


@pytest.mark.timeout(120)
@pytest.mark.parametrize("choice, build", [("cpu", "cpu"), ("cuda", "cu130"), ("cu126", "cu126"), ("cu132", "cu132")])
def test_torch_choice_picks_pytorch_index_and_pinned_build(choice, build):
    shown = make("-B", "join", "PEERS=/ip4/127.0.0.1/tcp/1/p2p/x", f"TORCH={choice}")
    assert shown.returncode == 0, shown.stderr
    command = torch_install(shown.stdout)
    assert f"--extra-index-url https://download.pytorch.org/whl/{build} " in command
    assert f"'torch=={PINNED}+{build}'" in command
    assert f"touch .venv/.installed-torch-{build}" in shown.stdout


@pytest.mark.timeout(60)
def test_unknown_choice_is_one_clear_line():
    shown = make("install", "TORCH=rocm")
    assert shown.returncode == 2
    assert shown.stderr.strip().endswith(
        "TORCH=rocm is not a PyTorch build; choose one of: cpu cuda cu126 cu129 cu130 cu132.  Stop."), shown.stderr
    assert len(shown.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_mirror_of_the_index_or_none():
    mirror = torch_install(make("-B", "install", "TORCH_INDEX_URL=https://mirror.example/whl/cpu").stdout)
    assert "--extra-index-url https://mirror.example/whl/cpu " in mirror
    local = torch_install(make("-B", "install", "TORCH_INDEX_URL=").stdout)
    assert "--extra-index-url" not in local and f"'torch=={PINNED}+cpu'" in local


@pytest.mark.timeout(120)
def test_changed_choice_reinstalls_torch(tmp_path):
    """An installed CPU environment is up to date for TORCH=cpu, and not for TORCH=cuda (nor back)."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv" / ".installed-torch-cpu"
    stamp.touch()
    os.utime(stamp, (stamp.stat().st_mtime + 10,) * 2)  # newer than the files it depends on

    assert "pip install" not in make("install", cwd=tmp_path).stdout
    assert "pip install" not in make("install", "TORCH=cpu", cwd=tmp_path).stdout
    switch = make("install", "TORCH=cuda", cwd=tmp_path).stdout
    assert f"'torch=={PINNED}+cu130'" in torch_install(switch)
    # the recipe removes every stamp first, so going back to cpu after cuda reinstalls too
    assert "rm -f .venv/.installed .venv/.installed-torch-*" in switch
