"""A private run through the real CLI: `swarm run create --private`, `swarm id`, `swarm admit`, a
certified bootstrap peer and trainers, an outsider process that knows every multiaddr (tests/outsider.py),
a certified monitor reading the swarm, and `swarm revoke`.

The same outsider against an open run downloads a trainer's whole model: what admission stops.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import DEBUG_CONFIG, REPO, STARTUP_TIMEOUT, run_cli
from harness.processes import read_json, wait_for
from peers import exit_codes
from test_bad_input import assert_one_clear_line

pytestmark = pytest.mark.swarm  # the slow lane: starts peers as processes (see conftest.py)

OUTSIDER = (sys.executable, str(REPO / "tests" / "outsider.py"))
REFRESH = 3.0  # the run's manifest.refresh: a revocation takes effect within it
DILOCO = ("averaging.mode=diloco", "diloco.inner_steps=10", "averaging.compression=fp16", "training.max_epochs=1000")
JOINED = re.compile(r"joined run \S+ as \w+ \((/ip4/[^)]+)\)")
DIRECT = re.compile(r"direct links for round parts listen on (\S+) ")


def owner_cli(*args: str) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def admitted(workdir: Path, name: str, role: str) -> tuple[Path, Path, str]:
    """A key file, its certificate as ``role`` and its peer id, through `swarm id` and `swarm admit`."""
    key, certificate = workdir / f"{name}.key", workdir / f"{name}.cert.json"
    peer_id = owner_cli("id", "--identity", str(key)).strip().splitlines()[-1]
    owner_cli("admit", peer_id, "--manifest", str(workdir / "manifest.json"), "--key", str(workdir / "authority.key"),
              "--role", role, "--organization", f"org {name}", "--days", "1", "--out", str(certificate))
    return key, certificate, peer_id


def trainer_maddr(swarm, name: str) -> str:
    return wait_for(lambda: (m := JOINED.search((swarm.workdir / f"{name}.log").read_text())) and m.group(1),
                    timeout=STARTUP_TIMEOUT, what=f"{name}'s address")


def trainer_target(swarm, name: str) -> str:
    """``MADDR,HOST:PORT``: the trainer's libp2p address and where its direct links listen (its log says)."""
    direct = wait_for(lambda: (m := DIRECT.search((swarm.workdir / f"{name}.log").read_text())) and m.group(1),
                      timeout=STARTUP_TIMEOUT, what=f"{name}'s direct port")
    return f"{trainer_maddr(swarm, name)},{direct}"


@pytest.fixture(scope="module")
def private_run(module_swarm):
    workdir = module_swarm.workdir
    created = owner_cli("run", "create", "--config", str(DEBUG_CONFIG), *[f"--set={item}" for item in DILOCO],
                        "--private", "--refresh", str(REFRESH), "--key", str(workdir / "authority.key"),
                        "--out", str(workdir / "manifest.json"))
    assert "(private)" in created
    fingerprint = json.loads((workdir / "manifest.json").read_text())["fingerprint"]
    people = {name: admitted(workdir, name, role) for name, role in
              [("bootstrap", "bootstrap"), ("a", "institution"), ("b", "volunteer"), ("watcher", "monitor")]}
    # the fixture's bootstrap runs as workdir/bootstrap.key: the identity its certificate was issued for
    bootstrap, maddr = module_swarm.bootstrap("--manifest", str(workdir / "manifest.json"), "--certificate",
                                              str(people["bootstrap"][1]))
    return {"workdir": workdir, "fingerprint": fingerprint, "people": people, "bootstrap": bootstrap, "maddr": maddr}


@pytest.fixture(scope="module")
def trained(module_swarm, private_run):
    """Trainers a and b of the private run, past round 2; joined by the bootstrap's line with their certificates."""
    line = wait_for(lambda: next((row.strip() for row in private_run["bootstrap"].log_path.read_text().splitlines()
                                  if row.strip().startswith("swarm join ")), None),
                    timeout=STARTUP_TIMEOUT, what="the join line")
    assert line == f"swarm join --initial-peers {private_run['maddr']} --run {private_run['fingerprint']} " \
                   f"--certificate YOUR_CERTIFICATE.json"
    trainers = {}
    for name in "ab":
        key, certificate, _ = private_run["people"][name]
        args = line.split()[2:-1] + [str(certificate)]  # the printed line, with this peer's certificate
        trainers[name] = module_swarm.trainer(name, [], f"network.identity_path={key}", extra=tuple(args))
    wait_for(lambda: min(module_swarm.epoch(name) for name in "ab") >= 2, timeout=240, what="round 2 of the private run",
             alive=list(trainers.values()))
    return trainers


@pytest.mark.timeout(420)
def test_outsider_is_refused_everywhere_and_training_goes_on(module_swarm, private_run, trained):
    targets = [trainer_target(module_swarm, name) for name in "ab"]
    report = private_run["workdir"] / "outsider.json"
    outsider = module_swarm.start("outsider", [str(report), "swarm-debug", private_run["maddr"], *targets],
                                  program=OUTSIDER)
    result = wait_for(lambda: read_json(report), timeout=180, what="the outsider's report", alive=[outsider])
    assert result["dht"]["outcome"] == "refused", result
    for peer, attempts in result["services"].items():
        # the direct port: the handshake proves who the outsider is, and the connection closes unanswered
        # (test_outsider_takes_the_model_of_an_open_run: the same request gets an answer in an open run)
        direct = attempts.pop("direct")
        assert direct["outcome"] == "refused" and "broke off" in direct["answer"], (peer, direct)
        for what, attempt in attempts.items():
            assert attempt["outcome"] == "refused" and "not-admitted" in attempt["answer"], (peer, what, attempt)
    for name in "ab":
        log = (module_swarm.workdir / f"{name}.log").read_text()
        assert "(not-admitted)" in log, log[-3000:]  # refusals are logged once a minute per reason
    assert "not-admitted" in private_run["bootstrap"].log_path.read_text()
    # honest peers train on, in the run with the manifest's settings and their certified roles
    rounds = {name: module_swarm.epoch(name) for name in "ab"}
    wait_for(lambda: all(module_swarm.epoch(name) > rounds[name] + 1 for name in "ab"), timeout=180,
             what="two more rounds", alive=list(trained.values()))
    assert module_swarm.status("a")["role"] == "institution" and module_swarm.status("b")["role"] == "volunteer"
    assert module_swarm.status("a")["run"]["admission"] == "private"


@pytest.mark.timeout(300)
def test_no_certificate_means_no_way_in_with_one_line(private_run):
    common = ["--config", str(DEBUG_CONFIG), "--initial-peers", private_run["maddr"],
              "--set", "network.bootstrap_timeout=4"]
    joiner = run_cli("join", "--run", private_run["fingerprint"], *common)
    assert_one_clear_line(joiner, exit_codes.UNREACHABLE, "none of the initial peers answered",
                          "valid certificate of it (--certificate)")
    status = run_cli("status", "--wait", "1", *common)
    assert_one_clear_line(status, exit_codes.UNREACHABLE, "none of the initial peers answered")
    # a monitor's certificate does not make a trainer
    key, certificate, _ = private_run["people"]["watcher"]
    watcher = run_cli("join", "--certificate", str(certificate), "--set", f"network.identity_path={key}", *common[:4])
    assert_one_clear_line(watcher, exit_codes.MANIFEST, "makes it a monitor, which does not train")
    # someone else's certificate is of no use either
    other = run_cli("join", "--certificate", str(certificate), *common[:4])
    assert_one_clear_line(other, exit_codes.MANIFEST, "the certificate is for peer")


@pytest.mark.timeout(300)
def test_certified_monitor_reads_the_private_swarm(private_run, trained):
    key, certificate, _ = private_run["people"]["watcher"]
    result = run_cli("status", "--json", "--wait", "30", "--initial-peers", private_run["maddr"],
                     "--certificate", str(certificate), "--set", f"network.identity_path={key}")
    assert result.returncode == 0, result.stderr[-2000:]
    view = json.loads(result.stdout)
    assert view["run_id"] == "swarm-debug"
    roles = {peer["peer_id"]: peer["role"] for peer in view["peers"]}
    assert roles.get(private_run["people"]["a"][2]) == "institution", roles


@pytest.mark.timeout(300)
def test_revoked_peer_is_out_within_a_refresh(module_swarm, private_run, trained):
    _, _, victim = private_run["people"]["b"]
    manifest = private_run["workdir"] / "manifest.json"
    owner_cli("revoke", victim, "--manifest", str(manifest), "--key", str(private_run["workdir"] / "authority.key"))
    signed = manifest.stat().st_mtime  # the new version is in the file the bootstrap peer serves
    code = wait_for(lambda: trained["b"].poll(), timeout=120, what="the revoked peer to leave")
    left = time.time() - signed
    log_a = module_swarm.workdir / "a.log"
    wait_for(lambda: "version 2 (was 1); revoked: " + victim in log_a.read_text(), timeout=60,
             what="a to read the revocation")
    seen = time.time() - signed
    print(f"revocation: the revoked peer left after {left:.1f}s, the other saw it after {seen:.1f}s "
          f"(manifest.refresh {REFRESH:g}s)")
    assert code == exit_codes.MANIFEST, trained["b"].log_tail(40)
    assert "revoked this peer's certificate" in trained["b"].log_tail(40)
    # within one refresh period of the bootstrap publishing it, plus the time DHT calls take on a busy machine
    assert seen < REFRESH + 30, seen
    rounds = module_swarm.epoch("a")
    wait_for(lambda: module_swarm.epoch("a") > rounds, timeout=180, what="a to train on alone", alive=[trained["a"]])


@pytest.mark.timeout(300)
def test_outsider_takes_the_model_of_an_open_run(swarm):
    """The attack with admission off: the same outsider against an open DiLoCo run gets the state."""
    _, address = swarm.bootstrap()
    trainer = swarm.trainer("open", [address], *DILOCO)
    wait_for(lambda: swarm.epoch("open") >= 1, timeout=STARTUP_TIMEOUT * 2, what="round 1", alive=[trainer])
    report = swarm.workdir / "outsider.json"
    outsider = swarm.start("outsider", [str(report), "swarm-debug", address, trainer_target(swarm, "open")],
                           program=OUTSIDER)
    result = wait_for(lambda: read_json(report), timeout=180, what="the outsider's report", alive=[outsider])
    assert result["dht"]["outcome"] == "served"
    (attempts,) = result["services"].values()
    assert attempts["state"]["outcome"] == "served" and attempts["state"]["bytes"] > 100_000, attempts
    # and its direct port serves anyone who proves some id: the request reaches the service (which finds no
    # such group), where the private run closed the connection after the handshake
    assert attempts["endpoints"]["outcome"] == "served" and attempts["endpoints"]["endpoints"], attempts
    assert attempts["direct"]["outcome"] == "answered" and "not yours" in attempts["direct"]["answer"], attempts
