"""A user's mistake ends in one clear line and a documented exit code, and loses nothing."""

from __future__ import annotations

import hashlib
import socket

import pytest

from conftest import DEBUG_CONFIG, run_cli
from peers import exit_codes

A_PEER_ID = "12D3KooWGUeQLTE63eTY7cBSuAeajwMUgUa84rPVAN5NJhocoMVi"


def assert_one_clear_line(result, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("swarm "), last
    for fragment in fragments:
        assert fragment in last, last
    return last


def join(*args: str, timeout: float = 60.0):
    """`swarm join` with the debug config; a new swarm of its own unless ``args`` name initial peers."""
    alone = () if any(arg.startswith("--initial-peers") for arg in args) else ("--new-swarm",)
    return run_cli("join", "--config", str(DEBUG_CONFIG), *alone, *args, timeout=timeout)


@pytest.mark.timeout(60)
def test_malformed_multiaddr():
    result = join("--initial-peers", f"/ip4/1.2.3/tcp/1/p2p/{A_PEER_ID}")
    assert_one_clear_line(result, exit_codes.USAGE, "malformed multiaddr", "/ip4/1.2.3/tcp/1")


@pytest.mark.timeout(60)
def test_multiaddr_without_peer_id():
    result = join("--initial-peers", "/ip4/127.0.0.1/tcp/31337")
    assert_one_clear_line(result, exit_codes.USAGE, "/p2p/<peer id>")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content, fragment", [(None, "FileNotFoundError"), ("{}", "KeyError"),
                                               ('{"maddrs": "/ip4/1.2.3.4"}', "list of multiaddrs")])
def test_unusable_initial_peers_file(tmp_path, content, fragment):
    address_file = tmp_path / "bootstrap.json"
    if content is not None:
        address_file.write_text(content)
    result = join("--initial-peers-file", str(address_file))
    assert_one_clear_line(result, exit_codes.USAGE, str(address_file), fragment)


@pytest.mark.timeout(120)
def test_unreachable_bootstrap_peer(tmp_path):
    # nothing listens on port 1; the peer retries with backoff for 6 s, then gives up with a clear line
    (tmp_path / "checkpoints").mkdir()
    result = run_cli("join", "--config", str(DEBUG_CONFIG), "--initial-peers", f"/ip4/127.0.0.1/tcp/1/p2p/{A_PEER_ID}",
                     "--set", "network.bootstrap_timeout=6", "--set", f"checkpoint.dir={tmp_path / 'checkpoints'}",
                     timeout=100, env={"TMPDIR": str(tmp_path)})
    assert_one_clear_line(result, exit_codes.UNREACHABLE, "none of the initial peers answered within 6s")
    assert not any((tmp_path / "checkpoints").iterdir()), "a peer that never joined must not write anything"
    assert_no_key_left(tmp_path)


def assert_no_key_left(tmpdir) -> None:
    """An ephemeral identity's private key lives in TMPDIR/swarm-identity-* only while p2pd reads it."""
    left = sorted(str(path) for path in tmpdir.glob("swarm-identity-*"))
    assert not left, f"a failed start left its private key behind: {left}"


@pytest.mark.timeout(60)
def test_refused_certificate_before_the_network_leaves_no_key(tmp_path):
    certificate = tmp_path / "certificate.json"
    certificate.write_text("{}")
    result = run_cli("join", "--config", str(DEBUG_CONFIG), "--new-swarm", "--certificate", str(certificate),
                     "--set", f"checkpoint.dir={tmp_path / 'checkpoints'}", env={"TMPDIR": str(tmp_path)})
    assert_one_clear_line(result, exit_codes.MANIFEST, str(certificate))
    assert_no_key_left(tmp_path)


@pytest.mark.timeout(60)
def test_unknown_config_key_names_the_key_and_the_accepted_ones():
    result = join("--set", "optimizer.lrr=0.1")
    last = assert_one_clear_line(result, exit_codes.USAGE, "unknown key 'optimizer.lrr'")
    assert "lr" in last.split("accepted here:")[1]


@pytest.mark.timeout(60)
def test_unknown_key_in_yaml_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  batch_sise: 4\n")
    result = run_cli("join", "--config", str(config), "--new-swarm")
    assert_one_clear_line(result, exit_codes.USAGE, "unknown key 'training.batch_sise'")


@pytest.mark.timeout(60)
def test_wrong_value_type():
    result = join("--set", "training.batch_size=lots")
    assert_one_clear_line(result, exit_codes.USAGE, "training.batch_size", "'lots'")


@pytest.mark.timeout(60)
def test_unknown_environment_variable():
    result = run_cli("config", "show", env={"SWARM_TRAINING_BATCHSIZE": "4"})
    assert_one_clear_line(result, exit_codes.USAGE, "SWARM_TRAINING_BATCHSIZE")


@pytest.mark.timeout(60)
def test_missing_data_folder(tmp_path):
    result = join("--set", f"data.path={tmp_path / 'nowhere'}")
    assert_one_clear_line(result, exit_codes.DATA, "does not exist", str(tmp_path / "nowhere"))


@pytest.mark.timeout(60)
def test_data_folder_without_text(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\0" * 1000)
    result = join("--set", f"data.path={tmp_path}")
    assert_one_clear_line(result, exit_codes.DATA, "too little readable text")


@pytest.mark.timeout(60)
def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path):
    checkpoint = tmp_path / "latest.pt"
    checkpoint.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    result = join("--resume", "--set", f"checkpoint.dir={tmp_path}")
    assert_one_clear_line(result, exit_codes.CHECKPOINT, "corrupt", "left untouched")
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest.pt"]


@pytest.mark.timeout(60)
def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path):
    checkpoint = tmp_path / "latest.pt"
    checkpoint.write_bytes(b"precious")
    result = join("--set", f"checkpoint.dir={tmp_path}")
    assert_one_clear_line(result, exit_codes.CHECKPOINT, "--resume")
    assert checkpoint.read_bytes() == b"precious"


@pytest.mark.timeout(60)
def test_resume_without_checkpoint(tmp_path):
    result = join("--resume", "--set", f"checkpoint.dir={tmp_path}")
    assert_one_clear_line(result, exit_codes.CHECKPOINT, "no checkpoint to resume from")


# `swarm monitor` and `swarm status`: mistakes end before the network is touched

FAKE_PEER = f"/ip4/127.0.0.1/tcp/1/p2p/{A_PEER_ID}"


def monitor(*args: str, timeout: float = 60.0):
    return run_cli("monitor", "--config", str(DEBUG_CONFIG), "--initial-peers", FAKE_PEER, *args, timeout=timeout)


@pytest.mark.timeout(60)
def test_monitor_history_of_another_run(tmp_path):
    from swarm.telemetry.history import History

    History(tmp_path / "m.sqlite", "another-run").close()
    result = monitor("--set", f"monitor.db_path={tmp_path / 'm.sqlite'}", "--set", "monitor.port=0")
    assert_one_clear_line(result, exit_codes.MONITOR, "holds the history of run 'another-run'")


@pytest.mark.timeout(60)
def test_monitor_history_file_that_is_not_a_database(tmp_path):
    (tmp_path / "m.sqlite").write_bytes(b"definitely not sqlite" * 100)
    result = monitor("--set", f"monitor.db_path={tmp_path / 'm.sqlite'}", "--set", "monitor.port=0")
    assert_one_clear_line(result, exit_codes.MONITOR, "cannot use", "m.sqlite")
    assert (tmp_path / "m.sqlite").read_bytes() == b"definitely not sqlite" * 100


@pytest.mark.timeout(60)
def test_monitor_port_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = monitor("--set", f"monitor.db_path={tmp_path / 'm.sqlite'}", "--set", f"monitor.port={port}")
    assert_one_clear_line(result, exit_codes.MONITOR, f"127.0.0.1:{port}", "monitor.port")


@pytest.mark.timeout(60)
def test_monitor_and_status_need_a_peer_address():
    for command in ("monitor", "status"):
        result = run_cli(command, "--config", str(DEBUG_CONFIG))
        assert_one_clear_line(result, exit_codes.USAGE, "needs the address of a peer")


@pytest.mark.timeout(60)
def test_csv_export_without_history(tmp_path):
    result = run_cli("monitor", "--config", str(DEBUG_CONFIG), "--set", f"monitor.db_path={tmp_path / 'none.sqlite'}",
                     "--export-csv", str(tmp_path / "csv"))
    assert_one_clear_line(result, exit_codes.MONITOR, "no monitor history")
    assert not (tmp_path / "none.sqlite").exists()
