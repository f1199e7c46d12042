"""The config tree: every shipped config loads; YAML, env and --set combine in a documented order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO
from peers.cli import build_parser
from swarm.config.loading import dump_config, load_config
from swarm.config.schema import DiLoCoConfig, SwarmConfig
from swarm.errors import ConfigError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(path.name == "debug.yaml" for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_config_loads_and_round_trips(path: Path, tmp_path):
    config = load_config(path, environ={})
    assert isinstance(config, SwarmConfig)
    shown = _write(tmp_path / "shown.yaml", dump_config(config))  # what `swarm config show` prints
    assert load_config(shown, environ={}) == config


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_yaml_then_env_then_overrides(tmp_path):
    config_file = _write(tmp_path / "c.yaml", "run_id: from-yaml\ntraining:\n  batch_size: 3\n  seed: 7\n")
    config = load_config(config_file, ["training.batch_size=5"],
                         environ={"SWARM_TRAINING_BATCH_SIZE": "4", "SWARM_RUN_ID": "from-env"})
    assert (config.run_id, config.training.batch_size, config.training.seed) == ("from-env", 5, 7)


def test_environment_variables_reach_every_section():
    peer = "/ip4/10.0.0.1/tcp/31337/p2p/12D3KooWGUeQLTE63eTY7cBSuAeajwMUgUa84rPVAN5NJhocoMVi"
    config = load_config(environ={
        "SWARM_NETWORK_INITIAL_PEERS": f"{peer}, {peer}",
        "SWARM_DATA_PATH": "/data",
        "SWARM_PEER_DISPLAY_NAME": "lab-7",
        "SWARM_PEER_ORGANIZATION": "Uni",
        "SWARM_TRAINING_DEVICE": "cpu",
        "SWARM_CHECKPOINT_RESUME": "true",
        "SWARM_LOGLEVEL": "DEBUG",  # reserved: read by the entry point, not a config key
        "SWARM_STATUS_FILE": "/var/lib/swarm/status.json",  # reserved too: the default of --status-file
    })
    assert config.network.initial_peers == [peer, peer]
    assert str(config.data.path) == "/data" and config.peer.display_name == "lab-7"
    assert config.peer.organization == "Uni" and config.training.device == "cpu" and config.checkpoint.resume


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_checkpoint_resume_is_true_false_or_auto(value, expected):
    assert load_config(environ={"SWARM_CHECKPOINT_RESUME": value}).checkpoint.resume == expected


def test_null_section_turns_feature_off():
    assert load_config(overrides=["checkpoint=null"], environ={}).checkpoint is None
    assert load_config(overrides=["metrics=null"], environ={}).metrics is None


def test_monitor_settings_from_environment():
    config = load_config(environ={"SWARM_MONITOR_PORT": "9000", "SWARM_MONITOR_DB_PATH": "/data/m.sqlite",
                                  "SWARM_METRICS_PERIOD": "5"})
    assert (config.monitor.port, str(config.monitor.db_path), config.metrics.period) == (9000, "/data/m.sqlite", 5.0)


@pytest.mark.parametrize("override, fragment", [
    ("model.d_model=100", "divisible by model.n_heads"),
    ("data.shard_index=3", "data.shard_index (3) must be below data.num_shards (1)"),
    ("averaging.request_timeout=9", "must be below sync.matchmaking_time"),
    ("run_id=has space", "run_id"),
    ("optimizer.name=sgd", "'adamw' or 'adamw8bit'"),
    ("metrics.ttl=1", "metrics.ttl (1) must be above metrics.period (10)"),
    ("monitor.port=70000", "monitor.port"),
    ("checkpoint.resume=sometimes", "checkpoint.resume: expected true, false or auto, got 'sometimes'"),
    ("nonsense", "section.key=value"),
])
def test_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override], environ={})
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_progress_reports_idle_every_ten_seconds_unless_set_otherwise():
    """diloco.idle_refresh_period defaults to 10 s; the default yields to a longer refresh_period, a value the
    user set does not (it names both keys), and null means a report every refresh_period."""
    diloco = DiLoCoConfig()
    assert (diloco.refresh_period, diloco.idle_refresh_period) == (1.0, 10.0)
    assert DiLoCoConfig(refresh_period=20).refresh_period == 20
    assert DiLoCoConfig(idle_refresh_period=None).idle_refresh_period is None
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["diloco.refresh_period=20", "diloco.idle_refresh_period=5"], environ={})
    assert "diloco.idle_refresh_period (5.0) must be at least diloco.refresh_period (20.0)" in str(error.value)
    assert load_config(overrides=["diloco.idle_refresh_period=null"], environ={}).diloco.idle_refresh_period is None


def test_cli_options_are_frozen():
    """Every new flag is a reviewed change: update this list on purpose, together with the README."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    seen = {name: sorted(opt for action in sub._actions for opt in action.option_strings)
            for name, sub in commands.items() if name != "config"}
    show = commands["config"]._subparsers._group_actions[0].choices["show"]
    assert sorted(opt for action in show._actions for opt in action.option_strings) == sorted(
        ["--config", "--initial-peers", "--initial-peers-file", "--json", "--set", "-h", "--help"])
    assert seen == {
        "bootstrap": sorted(["--address-file", "--announce", "--certificate", "--config", "--identity",
                             "--initial-peers", "--initial-peers-file", "--manifest", "--name", "--port", "--run-id",
                             "--set", "--status-file", "-h", "--help"]),
        "join": sorted(["--announce", "--certificate", "--config", "--data", "--device", "--identity",
                        "--initial-peers", "--initial-peers-file", "--name", "--new-swarm", "--port", "--resume",
                        "--run", "--run-id", "--set", "--status-file", "-h", "--help"]),
        "doctor": sorted(["--certificate", "--config", "--initial-peers", "--initial-peers-file", "--json",
                          "--probe-mb", "--run", "--set", "-h", "--help"]),
        "run": sorted(["-h", "--help"]),
        "admit": sorted(["--days", "--key", "--manifest", "--organization", "--out", "--role", "-h", "--help"]),
        "revoke": sorted(["--key", "--manifest", "-h", "--help"]),
        "id": sorted(["--config", "--identity", "--set", "-h", "--help"]),
        "demo": sorted(["--config", "--epochs", "--peers", "--set", "--workdir", "-h", "--help"]),
        "monitor": sorted(["--certificate", "--config", "--export-csv", "--initial-peers", "--initial-peers-file",
                           "--run-id", "--set", "--url-file", "-h", "--help"]),
        "status": sorted(["--certificate", "--config", "--initial-peers", "--initial-peers-file", "--json",
                          "--run-id", "--set", "--wait", "-h", "--help"]),
        "health": sorted(["--json", "--max-age", "--status-file", "-h", "--help"]),
        "export": sorted(["--checkpoint", "--config", "--out", "--set", "-h", "--help"]),
        "generate": sorted(["--checkpoint", "--config", "--export", "--max-new-bytes", "--prompt", "--seed", "--set",
                            "--temperature", "--top-k", "-h", "--help"]),
    }
    run_commands = commands["run"]._subparsers._group_actions[0].choices
    assert sorted(opt for action in run_commands["create"]._actions for opt in action.option_strings) == sorted(
        ["--config", "--key", "--out", "--private", "--refresh", "--set", "-h", "--help"])


def test_forced_device_that_is_missing_is_a_config_error():
    from swarm.train.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="training.device: 'cuda' is not available"):
            resolve_device("cuda")


def test_config_accepts_exactly_the_registry_codec_names():
    from swarm.compression.registry import CODEC_NAMES

    for name in CODEC_NAMES:
        mode = "diloco" if name == "sparse" else "sync"  # sparse: swarm's own all-reduce only
        assert load_config(None, [f"averaging.compression={name}", f"averaging.mode={mode}"],
                           environ={}).averaging.compression == name
    with pytest.raises(ConfigError, match="averaging.compression"):
        load_config(None, ["averaging.compression=zstd"], environ={})
