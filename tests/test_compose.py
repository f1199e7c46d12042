"""The compose files and the image's environment agree with the CLI and the config tree.

No compose engine runs here, so these read the files: every service's command parses with the real
`swarm` parser, and every SWARM_* variable (the image's own and each service's) names a config key
with a valid value. The container test (test_container.py) runs the image itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from peers.cli import build_parser
from swarm.config.loading import load_config

DOCKER = REPO / "docker"
PEER = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooWGUeQLTE63eTY7cBSuAeajwMUgUa84rPVAN5NJhocoMVi"
# What an institution puts in its .env file: compose substitutes these into docker/institution.yaml.
EXAMPLE_DOTENV = {"INITIAL_PEERS": PEER, "DATA_DIR": "/srv/our-text", "DISPLAY_NAME": "uni-lab"}


def compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def services() -> list[tuple[str, str]]:
    """The services that run swarm's image (not, say, Prometheus)."""
    return [(name, service) for name in ("compose.yaml", "institution.yaml")
            for service, spec in compose(name)["services"].items() if "build" in spec or "swarm" in spec.get("image", "")]


def image_environment() -> dict[str, str]:
    """The ENV instructions of the Dockerfile's final stage."""
    final_stage = (DOCKER / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    env = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", final_stage, flags=re.MULTILINE):
        env.update(re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")))
    return env


def substitute(value, dotenv: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} interpolation."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        if name in dotenv:
            return dotenv[name]
        if op == ":?":
            raise KeyError(f"{name} is required: {arg}")
        return arg
    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, str(value))


def test_the_image_paths_are_config_keys():
    env = image_environment()
    assert env["SWARM_DATA_PATH"] == "/data" and env["SWARM_CHECKPOINT_RESUME"] == "auto"
    config = load_config(REPO / "configs" / "default.yaml", environ=env)
    assert str(config.network.identity_path).startswith("/var/lib/swarm/")
    assert str(config.checkpoint.dir).startswith("/var/lib/swarm/")


@pytest.mark.parametrize("file, service", services(), ids=lambda item: item)
def test_every_service_command_and_environment_is_valid(file, service):
    spec = compose(file)["services"][service]
    parser = build_parser()
    role = spec["command"][0]
    if role not in parser._subparsers._group_actions[0].choices:
        pytest.skip(f"`swarm {role}` is not part of this build of swarm")
    parser.parse_args(spec["command"])  # exits (fails the test) on an unknown option

    env = {**image_environment(), **{key: substitute(value, EXAMPLE_DOTENV)
                                     for key, value in spec.get("environment", {}).items()}}
    config_file = REPO / "configs" / Path(env.pop("SWARM_CONFIG")).name
    load_config(config_file, environ=env)  # raises ConfigError naming a bad variable or value


def test_local_swarm_gives_each_peer_its_own_state_and_shard():
    spec = compose("compose.yaml")["services"]
    assert {"bootstrap", "trainer-1", "trainer-2", "monitor"} <= set(spec)
    trainers = [spec[name] for name in spec if name.startswith("trainer")]
    state_volumes = [volume for service in spec.values() for volume in service.get("volumes", [])
                     if volume.endswith(":/var/lib/swarm")]
    assert len(state_volumes) == len(set(state_volumes)) == 1 + len(trainers), "one identity per peer"
    assert sorted(t["environment"]["SWARM_DATA_SHARD_INDEX"] for t in trainers) == ["0", "1"]
    assert spec["monitor"]["ports"], "the dashboard port must be published"
    assert all(service["depends_on"]["bootstrap"]["condition"] == "service_healthy"
               for name, service in spec.items() if name != "bootstrap" and "build" in service)  # swarm's peers


def test_institution_peer_mounts_data_read_only_and_reserves_gpus():
    spec = compose("institution.yaml")["services"]["peer"]
    assert substitute(spec["volumes"][0], EXAMPLE_DOTENV) == "/srv/our-text:/data:ro"
    assert "state:/var/lib/swarm" in spec["volumes"]
    devices = spec["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    with pytest.raises(KeyError, match="INITIAL_PEERS"):
        substitute(spec["environment"]["SWARM_NETWORK_INITIAL_PEERS"], {})


def test_prometheus_service_scrapes_the_monitor_with_the_shipped_config():
    spec = compose("compose.yaml")["services"]
    prometheus = spec["prometheus"]
    assert re.fullmatch(r"[\w./-]+:v\d+\.\d+\.\d+", prometheus["image"]), "pin an exact Prometheus release"
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert all(port.startswith("127.0.0.1:") for port in prometheus["ports"])
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    monitor_port = next(item.split("=")[1] for item in spec["monitor"]["command"] if item.startswith("monitor.port="))
    assert [job["static_configs"][0]["targets"] for job in scrape] == [[f"monitor:{monitor_port}"]]
    assert scrape[0]["metrics_path"] == "/metrics"


def test_grafana_dashboard_queries_only_series_the_monitor_exports():
    import json

    from prometheus_client.parser import text_string_to_metric_families

    from swarm.net.metrics_record import PeerMetrics
    from swarm.telemetry.collector import Collector
    from swarm.telemetry.prometheus import SwarmCollector, exposition, make_registry

    record = PeerMetrics.parse_obj(dict(
        peer_id="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", role="volunteer", state="running",
        display_name="lab", organization=None, device="cpu", epoch=3, samples_total=480, samples_per_second=40.0,
        loss=3.2, heldout_loss=3.1, bytes_sent=1000, bytes_received=2000, rounds_ok=3, rounds_failed=0,
        refused={"schema": 1}, refused_requests={"fetch-limit": 1}, reachability="direct", uptime=12.0,
        version="0.1.0", time=1000.0))
    view = Collector(dht=None, run_id="r", max_samples_per_second=1e5).assemble(
        [(record.peer_id, record)], {"schema": 1}, now=1000.0, collected_at=1000.0)
    rows = [{**record.dict(), "contributed": 480}]
    text = exposition(make_registry(SwarmCollector(lambda: (view, {}), lambda: rows))).decode()
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}

    dashboard = json.loads((DOCKER / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\bswarm_[a-z_]+", expr)}
    assert queried and queried <= exported, queried - exported
    for needed in ("swarm_peer_info", "swarm_peer_loss", "swarm_peer_sent_bytes_total", "swarm_samples_per_second"):
        assert needed in queried


# The builds of the pinned torch that PyTorch's wheel index has: the Makefile's list (docs/install.md).
TORCH_BUILDS = set(re.search(r"^TORCH_BUILDS := (.*)$", (REPO / "Makefile").read_text(), flags=re.MULTILINE)
                   .group(1).split())


def dockerfile_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults (the first one of each name)."""
    args: dict[str, str] = {}
    for name, default in re.findall(r"^ARG (\w+)(?:=(\S*))?$", (DOCKER / "Dockerfile").read_text(), flags=re.MULTILINE):
        args.setdefault(name, default)
    return args


def test_dashboard_is_published_on_localhost_unless_asked():
    ports = compose("compose.yaml")["services"]["monitor"]["ports"]
    assert [substitute(port, {}) for port in ports] == ["127.0.0.1:8080:8080"]
    assert [substitute(port, {"DASHBOARD_ADDRESS": "0.0.0.0"}) for port in ports] == ["0.0.0.0:8080:8080"]
    for file, service in services():  # no other published port of any service escapes the rule
        for port in compose(file)["services"][service].get("ports", []):
            assert substitute(port, {}).startswith("127.0.0.1:"), (file, service, port)


def test_both_images_apply_constraints_and_the_tested_torch():
    """The CPU image (compose.yaml) and the GPU image (institution.yaml) build docker/Dockerfile with the
    repository's constraints.txt and a PyTorch build of the pinned version, on a pinned base image."""
    text = (DOCKER / "Dockerfile").read_text()
    args = dockerfile_args()
    assert args["PIP_CONSTRAINT"] == "/src/constraints.txt"
    assert re.search(r"^COPY pyproject.toml constraints.txt /src/$", text, flags=re.MULTILINE)
    assert '"torch==${torch_version}+${TORCH}"' in text and "sed -n 's/^torch==" in text
    assert args["TORCH"] == "cpu" and args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH}"
    # an exact tag (Python patch release and Debian release) or a digest, never a floating tag
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", args["BASE_IMAGE"])

    builds = {}
    for file in ("compose.yaml", "institution.yaml"):
        for name, service in compose(file)["services"].items():
            build = service.get("build")
            if build is None:
                continue
            assert build["dockerfile"] == "docker/Dockerfile"
            build_args = {key: substitute(value, {}) for key, value in build.get("args", {}).items()}
            assert not {"PIP_CONSTRAINT", "BASE_IMAGE"} & set(build_args), (file, name, build_args)
            builds[service["image"]] = build_args.get("TORCH", args["TORCH"])
    assert builds == {"swarm:cpu": "cpu", "swarm:gpu": "cu130"}
    assert set(builds.values()) <= TORCH_BUILDS


def test_init_is_pid_one_in_every_container():
    """tini is the entrypoint, so `docker run` gets it too; compose does not add a second init."""
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "swarm"]' in text
    assert "install -y -qq --no-install-recommends tini" in text
    for file, service in services():
        assert "init" not in compose(file)["services"][service], (file, service)
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', text))
    assert {"title", "licenses", "source", "version", "revision"} <= {key.split("image.", 1)[1] for key in labels}
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
