"""The README's main job, shortened: `swarm demo` trains, summarizes and leaves no process behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.timeout(300)
def test_demo_trains_summarizes_and_cleans_up(tmp_path):
    workdir = tmp_path / "demo"
    try:
        result = run_cli("demo", "--peers", "2", "--epochs", "3", "--workdir", str(workdir), timeout=280)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out = result.stdout
        assert "dashboard at http://127.0.0.1:" in out
        assert "round   3/3" in out, "progress lines show the rounds"
        summary = out.split("swarm demo finished in", 1)[1]
        before, after = (float(x) for x in summary.split("held-out loss")[1].split("(")[0].split("->"))
        assert after < before - 0.5
        assert "final models differ by at most 0.00e+00" in summary
        assert not processes_mentioning(str(workdir)), "the demo left peers running"
    finally:  # if the demo failed to clean up, this test still must
        for pid in processes_mentioning(str(workdir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
