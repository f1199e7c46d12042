"""The `swarm` command as users meet it: flags for common settings, typed overrides, environment
variables, --json, help with examples. Fast lane: config-level runs of the real command, no swarm."""

from __future__ import annotations

import json
import time

import pytest

from conftest import DEBUG_CONFIG, run_cli
from peers import exit_codes
from peers.cli import KEY_FLAGS, _overrides, build_parser
from swarm.config.loading import load_config
from test_bad_input import A_PEER_ID, assert_one_clear_line

PEER = f"/ip4/127.0.0.1/tcp/31337/p2p/{A_PEER_ID}"


def show(*args: str, env: dict | None = None) -> tuple[dict, str]:
    """`swarm config show --json ARGS`: the resolved config and what was said on stderr."""
    result = run_cli("config", "show", "--json", *args, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


@pytest.mark.timeout(30)
def test_key_flags_set_the_same_keys_as_set():
    flags = ["--port", "31337", "--announce", "/ip4/203.0.113.5/tcp/31337", "/ip6/2001:db8::5/tcp/31337",
             "--identity", "/keys/peer.key", "--data", "/srv/text", "--name", "2024", "--device", "cpu",
             "--run-id", "lab-run"]
    assert {flag for flag in flags if flag.startswith("--")} == set(KEY_FLAGS), "every flag of the table is tried"
    by_flags = load_config(DEBUG_CONFIG, _overrides(build_parser().parse_args(
        ["join", "--initial-peers", PEER, *flags])), environ={})
    by_set = load_config(DEBUG_CONFIG, [
        f"network.initial_peers={PEER}", "network.port=31337",
        "network.announce_maddrs=/ip4/203.0.113.5/tcp/31337,/ip6/2001:db8::5/tcp/31337",
        "network.identity_path=/keys/peer.key", "data.path=/srv/text", "peer.display_name=2024",
        "training.device=cpu", "run_id=lab-run"], environ={})
    assert by_flags == by_set
    assert (by_flags.network.port, by_flags.peer.display_name, str(by_flags.data.path)) == (31337, "2024", "/srv/text")


@pytest.mark.timeout(60)
def test_a_flag_with_a_bad_value_names_its_key():
    result = run_cli("join", "--config", str(DEBUG_CONFIG), "--new-swarm", "--port", "99999")
    assert_one_clear_line(result, exit_codes.USAGE, "network.port")


@pytest.mark.timeout(60)
def test_new_swarm_with_initial_peers_is_refused():
    result = run_cli("join", "--config", str(DEBUG_CONFIG), "--new-swarm", "--initial-peers", PEER)
    assert_one_clear_line(result, exit_codes.USAGE, "--new-swarm", "no initial peers")


@pytest.mark.timeout(60)
def test_join_without_peers_is_refused_also_from_environment_peers_missing():
    # SWARM_NETWORK_INITIAL_PEERS blank (a compose file's ${INITIAL_PEERS:-}) is no peer either
    result = run_cli("join", "--config", str(DEBUG_CONFIG), env={"SWARM_NETWORK_INITIAL_PEERS": ""})
    assert_one_clear_line(result, exit_codes.USAGE, "no initial peers", "--new-swarm")


@pytest.mark.timeout(60)
def test_overrides_are_typed_by_the_schema():
    config, _ = show("--set", "peer.display_name=yes", "--set", "peer.organization=2024", "--set", "run_id=007",
                     "--set", "training.batch_size=8", "--set", "checkpoint.resume=true", "--set", "metrics=null",
                     "--set", "optimizer.betas=[0.8, 0.9]")
    assert (config["peer"]["display_name"], config["peer"]["organization"], config["run_id"]) == ("yes", "2024", "007")
    assert (config["training"]["batch_size"], config["checkpoint"]["resume"], config["metrics"]) == (8, True, None)
    assert config["optimizer"]["betas"] == [0.8, 0.9]
    # the same through SWARM_* variables
    config, _ = show(env={"SWARM_PEER_DISPLAY_NAME": "no", "SWARM_RUN_ID": "2024", "SWARM_TRAINING_SEED": "3"})
    assert (config["peer"]["display_name"], config["run_id"], config["training"]["seed"]) == ("no", "2024", 3)


@pytest.mark.timeout(60)
def test_unknown_environment_variables_are_ignored_with_one_warning_each():
    kubernetes = {"SWARM_SERVICE_HOST": "10.0.0.7", "SWARM_SERVICE_PORT": "8470", "SWARM_PORT": "tcp://10.0.0.7:8470",
                  "SWARM_PORT_8470_TCP_ADDR": "10.0.0.7", "SWARM_PORT_8470_TCP_PROTO": "tcp"}
    config, stderr = show(env=kubernetes)
    assert config["run_id"] == "swarm"
    warnings = [line for line in stderr.splitlines() if "names no config key" in line]
    assert sorted(name for line in warnings for name in kubernetes if f" {name} " in line) == sorted(kubernetes)
    assert len(warnings) == len(kubernetes), stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("typo, meant", [("SWARM_TRAINING_BATCHSIZE", "SWARM_TRAINING_BATCH_SIZE"),
                                         ("SWARM_DATA_PAHT", "SWARM_DATA_PATH"),
                                         ("SWARM_LOGLEVL", "SWARM_LOGLEVEL")])
def test_a_typo_of_a_known_variable_is_refused_with_a_suggestion(typo, meant):
    result = run_cli("config", "show", env={typo: "4"})
    assert_one_clear_line(result, exit_codes.USAGE, typo, f"did you mean {meant}?")


@pytest.mark.timeout(60)
def test_config_show_json_loads_back_as_the_same_config(tmp_path):
    config, _ = show("--config", str(DEBUG_CONFIG), "--set", "training.batch_size=3")
    saved = tmp_path / "shown.json"  # JSON is YAML: the shown config loads as a config file
    saved.write_text(json.dumps(config))
    assert load_config(saved, environ={}) == load_config(DEBUG_CONFIG, ["training.batch_size=3"], environ={})


@pytest.mark.timeout(60)
def test_health_json(tmp_path):
    status_file = tmp_path / "status.json"
    status_file.write_text(json.dumps({"role": "trainer", "peer_id": "QmPeer123456", "updated_at": time.time(),
                                       "initial_peers": 1, "connected_peers": 2, "epoch": 3, "samples": 96}))
    result = run_cli("health", "--json", "--status-file", str(status_file), timeout=30)
    verdict = json.loads(result.stdout)
    assert result.returncode == 0 and verdict["healthy"] and verdict["status"]["epoch"] == 3, result.stdout
    assert "connected to 2 peers" in verdict["reason"]
    status_file.write_text("[1, 2]")
    result = run_cli("health", "--json", "--status-file", str(status_file), timeout=30)
    assert result.returncode == 1 and json.loads(result.stdout)["healthy"] is False


def _subcommands(parser, prefix=()):
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for name, sub in action.choices.items():
            yield (*prefix, name), sub
            yield from _subcommands(sub, (*prefix, name))


@pytest.mark.timeout(30)
def test_every_subcommand_help_has_examples_of_itself():
    found = dict(_subcommands(build_parser()))
    assert {"join", "bootstrap", "monitor", "status", "health", "demo", "export", "generate"} <= {
        names[0] for names in found}
    for names, sub in found.items():
        text = sub.format_help()
        examples = text.split("Examples:\n", 1)
        assert len(examples) == 2, f"`swarm {' '.join(names)} --help` has no Examples section"
        assert f"swarm {' '.join(names)}" in examples[1], f"`swarm {' '.join(names)}` examples show other commands"


@pytest.mark.timeout(60)
def test_help_through_the_real_command():
    result = run_cli("join", "--help", timeout=30)
    assert result.returncode == 0
    assert "Examples:\n  swarm join --initial-peers" in result.stdout
    assert "--new-swarm" in result.stdout and "(network.port)" in result.stdout
