"""`swarm doctor`: one verdict per check, through the real CLI, against real peers.

Local checks (versions, data, memory, disk) need no swarm; the swarm checks run against a real
bootstrap peer, one whose clock is 10 s ahead (libfaketime, skipped where it is missing) and an
address where no peer listens.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest

from conftest import DEBUG_CONFIG, run_cli

pytestmark = pytest.mark.timeout(600)


def _verdicts(result) -> dict[str, dict]:
    report = json.loads(result.stdout)
    return {check["check"]: check for check in report["checks"]}


def test_local_checks_without_a_swarm_pass_and_a_missing_data_folder_fails(tmp_path):
    result = run_cli("doctor", "--config", str(DEBUG_CONFIG), "--set", f"checkpoint.dir={tmp_path}/ck", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for check in ("versions", "data", "memory", "disk"):
        assert any(line.startswith("[  ok]") and f" {check} " in line for line in lines), result.stdout
    assert any("[skip] swarm" in line for line in lines) and lines[-1] == "joining should work"
    assert "samples/s" in result.stdout and "bytes usable" in result.stdout

    missing = run_cli("doctor", "--config", str(DEBUG_CONFIG), "--set", f"data.path={tmp_path}/nowhere", "--json", timeout=240)
    assert missing.returncode == 9, missing.stderr[-2000:]
    verdicts = _verdicts(missing)
    assert verdicts["data"]["status"] == "fail" and "does not exist" in verdicts["data"]["detail"]
    assert verdicts["memory"]["status"] == "ok"  # one failed check does not stop the others


@pytest.mark.swarm
def test_against_a_healthy_swarm_every_check_passes(swarm):
    _, address = swarm.bootstrap()
    result = run_cli("doctor", "--config", str(DEBUG_CONFIG), "--initial-peers", address, "--json",
                     "--set", "network.listen_host=127.0.0.1", "--set", f"checkpoint.dir={swarm.workdir}/ck",
                     "--probe-mb", "2", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    verdicts = _verdicts(result)
    assert {name: verdicts[name]["status"] for name in ("bootstrap", "clock", "reachable", "bandwidth")} == {
        "bootstrap": "ok", "clock": "ok", "reachable": "ok", "bandwidth": "ok"}, verdicts
    assert "reachable directly" in verdicts["reachable"]["detail"]
    assert "Mbit/s up" in verdicts["bandwidth"]["detail"]


@pytest.mark.swarm
@pytest.mark.skipif(shutil.which("faketime") is None, reason="libfaketime's `faketime` is not installed")
def test_a_peer_whose_clock_is_10_s_ahead_is_named(swarm):
    program = ("env", "FAKETIME_DONT_FAKE_MONOTONIC=1", "faketime", "-f", "+10s", sys.executable, "-m", "peers")
    _, address = swarm.bootstrap(program=program)
    result = run_cli("doctor", "--config", str(DEBUG_CONFIG), "--initial-peers", address, "--json",
                     "--set", "network.listen_host=127.0.0.1", "--set", "network.bootstrap_timeout=20",
                     "--probe-mb", "0", timeout=180)
    assert result.returncode == 9, result.stdout + result.stderr[-3000:]
    clock = _verdicts(result)["clock"]
    assert clock["status"] == "fail" and "ntp" in clock["advice"].lower(), clock
    assert "-10." in clock["detail"] or "-9." in clock["detail"], clock  # this clock is behind the peer's
    # and `swarm join` says the same in one line, instead of hivemind's traceback
    joined = run_cli("join", "--config", str(DEBUG_CONFIG), "--initial-peers", address,
                     "--set", "network.listen_host=127.0.0.1", "--set", f"checkpoint.dir={swarm.workdir}/ck",
                     timeout=180)
    assert joined.returncode == 3, joined.stderr[-3000:]
    assert "clock is -10" in joined.stderr or "clock is -9" in joined.stderr, joined.stderr[-3000:]
    assert "Traceback" not in joined.stderr


@pytest.mark.swarm
def test_an_unreachable_bootstrap_is_one_failed_line(tmp_path):
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    result = run_cli("doctor", "--config", str(DEBUG_CONFIG), "--initial-peers", address,
                     "--set", "network.bootstrap_timeout=3", "--set", "network.listen_host=127.0.0.1",
                     "--set", f"checkpoint.dir={tmp_path}/ck", timeout=120)
    assert result.returncode == 9, result.stdout + result.stderr[-3000:]
    failed = [line for line in result.stdout.splitlines() if line.startswith("[fail]")]
    assert failed and "bootstrap" in failed[0] and "initial peers" in failed[0], result.stdout
    assert result.stdout.splitlines()[-1].startswith("joining would not work")


def test_probes_are_bounded_per_caller_and_in_all():
    """Anyone who reaches a peer may probe it: the bounds hold whoever asks (no network needed)."""
    from hivemind.p2p import PeerID

    from swarm.telemetry import probe

    servicer = probe.ProbeServicer()
    caller, other = PeerID(b"\x00\x01" + bytes(32)), PeerID(b"\x00\x01" + bytes(31) + b"\x01")
    assert all(servicer._admit(caller) is None for _ in range(probe.PROBES_PER_WINDOW))
    assert "probes per" in servicer._admit(caller)
    servicer._busy.add(other)
    assert servicer._admit(other) == "one probe at a time"
    servicer._busy.clear()
    servicer._spend(probe.BYTES_PER_WINDOW)
    assert "budget" in servicer._admit(other)
    assert probe._bounded_size(10**12) == probe.MAX_PROBE_BYTES and probe._bounded_size("9") == 0
