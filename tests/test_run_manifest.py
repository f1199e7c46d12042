"""A run with an owner, through the real CLI: `swarm run create`, a bootstrap peer publishing the
manifest, newcomers joining by the printed line, a contradicting joiner, and a forger in the DHT.

One run (authority key, manifest, bootstrap peer) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest

from conftest import DEBUG_CONFIG, REPO, STARTUP_TIMEOUT, run_cli
from harness.processes import PeerProcess, read_json, wait_for
from peers import exit_codes
from test_bad_input import assert_one_clear_line

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)

SWARM = Path(sys.executable).parent / "swarm"  # the command a user types
DEBUG_MODEL = {"seq_len": 64, "d_model": 128, "n_layers": 4, "n_heads": 4, "dropout": 0.0}


@pytest.fixture(scope="module")
def run(module_swarm):
    """The shared run: its manifest, fingerprint, bootstrap peer and the join line it printed."""
    workdir = module_swarm.workdir
    created = run_cli("run", "create", "--config", str(DEBUG_CONFIG), "--key", str(workdir / "authority.key"),
                      "--out", str(workdir / "manifest.json"))
    assert created.returncode == 0, created.stderr[-2000:]
    fingerprint = json.loads((workdir / "manifest.json").read_text())["fingerprint"]
    assert f"fingerprint {fingerprint}" in created.stdout
    bootstrap, maddr = module_swarm.bootstrap("--manifest", str(workdir / "manifest.json"))
    lines = wait_for(lambda: [line.strip() for line in bootstrap.log_path.read_text().splitlines()
                              if line.strip().startswith("swarm join ")],
                     timeout=STARTUP_TIMEOUT, what="the join line", alive=[bootstrap])
    return {"fingerprint": fingerprint, "bootstrap": bootstrap, "maddr": maddr, "lines": lines, "workdir": workdir}


def join_verbatim(swarm, name: str, line: str) -> tuple[PeerProcess, Path]:
    """Run a printed join line as typed, in a fresh folder (no config file: only the manifest's settings)."""
    words = shlex.split(line)
    assert words[:2] == ["swarm", "join"], line
    folder = swarm.workdir / name
    folder.mkdir()
    status = folder / "status.json"
    peer = PeerProcess(name, words[1:], log_path=swarm.workdir / f"{name}.log", program=(str(SWARM),),
                       cwd=folder, env={"SWARM_STATUS_FILE": str(status), "PYTHONPATH": str(REPO)})
    swarm.processes.append(peer)
    return peer, status


@pytest.mark.timeout(300)
def test_joiner_copying_the_printed_line_lands_in_the_run(module_swarm, run):
    assert run["lines"] == [f"swarm join --initial-peers {run['maddr']} --run {run['fingerprint']}"]
    started = time.monotonic()
    joiner, status_path = join_verbatim(module_swarm, "verbatim", run["lines"][0])
    status = wait_for(lambda: read_json(status_path), timeout=STARTUP_TIMEOUT, what="the joiner's status",
                      alive=[joiner])
    print(f"join with --run: status after {time.monotonic() - started:.1f}s")
    assert status["run"] == {"run_id": "swarm-debug", "fingerprint": run["fingerprint"], "manifest_version": 1,
                             "admission": "open", "model": DEBUG_MODEL, "averaging_mode": "sync"}
    # it trains: local steps on the manifest's model (the defaults would be a 384-wide model)
    wait_for(lambda: (read_json(status_path) or {}).get("steps", 0) > 0, timeout=STARTUP_TIMEOUT,
             what="a training step", alive=[joiner])
    assert joiner.stop() == 0


@pytest.mark.timeout(180)
def test_contradicting_joiner_refuses_with_one_line(run):
    result = run_cli("join", "--config", str(DEBUG_CONFIG), "--initial-peers", run["maddr"], "--run",
                     run["fingerprint"], "--set", "model.n_layers=2", "--set", "training.batch_size=4")
    assert_one_clear_line(result, exit_codes.MANIFEST, "contradicts the manifest of run swarm-debug",
                          "model.n_layers=2 (manifest: 4)")
    assert "batch_size" not in result.stderr.strip().splitlines()[-1]  # a local setting


@pytest.mark.timeout(180)
def test_unknown_run_is_one_line_within_the_bootstrap_timeout(run):
    started = time.monotonic()
    result = run_cli("join", "--config", str(DEBUG_CONFIG), "--initial-peers", run["maddr"], "--run", "a" * 32,
                     "--set", "network.bootstrap_timeout=5")
    assert_one_clear_line(result, exit_codes.MANIFEST, "no manifest of run " + "a" * 32, "within 5s")
    assert time.monotonic() - started < 90


@pytest.mark.timeout(300)
def test_forged_manifests_are_refused_by_nodes_and_joiners(module_swarm, run):
    report = run["workdir"] / "forger.json"
    forger = module_swarm.start("forger", [run["maddr"], run["fingerprint"], str(report)],
                                program=(sys.executable, str(REPO / "tests" / "manifest_forger.py")))
    wait_for(lambda: len((read_json(report) or {}).get("stores", {})) == 3, timeout=STARTUP_TIMEOUT,
             what="the forger's stores", alive=[forger])
    log = run["bootstrap"].log_path
    wait_for(lambda: "(forged: " in log.read_text() and "(expiration: " in log.read_text(), timeout=60,
             what="the bootstrap peer to refuse forgeries", alive=[forger])
    joiner, status_path = join_verbatim(module_swarm, "after-forger", run["lines"][0])
    status = wait_for(lambda: read_json(status_path), timeout=STARTUP_TIMEOUT, what="the joiner's status",
                      alive=[joiner])
    assert status["run"]["manifest_version"] == 1 and status["run"]["model"] == DEBUG_MODEL
    refusals = log.read_text()
    assert "(forged: " in refusals and "(expiration: " in refusals, refusals[-3000:]
    assert joiner.stop() == 0 and forger.stop() == 0


@pytest.mark.timeout(180)
def test_only_the_authority_key_signs_a_new_version(run, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text((run["workdir"] / "manifest.json").read_text())  # the bootstrap's own file stays as is
    again = run_cli("run", "create", "--config", str(DEBUG_CONFIG), "--set", "optimizer.lr=0.001",
                    "--key", str(run["workdir"] / "authority.key"), "--out", str(manifest))
    assert again.returncode == 0, again.stderr[-2000:]
    signed = json.loads(manifest.read_text())
    assert (signed["fingerprint"], signed["manifest"]["version"]) == (run["fingerprint"], 2)
    assert signed["manifest"]["settings"]["optimizer"]["lr"] == 0.001
    other = run_cli("run", "create", "--config", str(DEBUG_CONFIG), "--key", str(tmp_path / "other.key"),
                    "--out", str(manifest))
    assert_one_clear_line(other, exit_codes.USAGE, "holds the manifest of another run")
