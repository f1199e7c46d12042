"""Fixtures that start real peers as real processes through the real CLI, and always reap them.

Two lanes: a test marked ``swarm`` starts peers as processes (end to end, seconds to minutes each);
every other test is in the fast lane, ``make test-fast`` (``pytest -m "not swarm"``). ``make test``
runs both. A test that asks for a fixture starting peers must be marked, or collection fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from containers import ContainerPeer
from harness.processes import PeerProcess, read_json, wait_for

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "configs" / "debug.yaml"
STARTUP_TIMEOUT = 90.0  # generous: 2 cores shared by every peer of a test
# every averaging outcome in the peers' logs, which the fixture prints when a test fails
os.environ.setdefault("SWARM_HIVEMIND_LOGLEVEL", "INFO")


class Swarm:
    """Starts peers for one test; every process it started is killed at teardown, pass or fail."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.processes: list[PeerProcess | ContainerPeer] = []

    def start(self, name: str, args: list[str], program: tuple[str, ...] | None = None) -> PeerProcess:
        options = {"program": program} if program else {}
        peer = PeerProcess(name, args, log_path=self.workdir / f"{name}.log", **options)
        self.processes.append(peer)
        return peer

    def bootstrap(self, *extra: str, name: str = "bootstrap", program=None) -> tuple[PeerProcess, str]:
        address_file = self.workdir / f"{name}.json"
        address_file.unlink(missing_ok=True)
        peer = self.start(name, ["bootstrap", "--config", str(DEBUG_CONFIG), "--identity",
                                 str(self.workdir / f"{name}.key"), "--address-file", str(address_file), *extra],
                          program)
        info = wait_for(lambda: read_json(address_file), timeout=STARTUP_TIMEOUT, what=f"{name} to start", alive=[peer])
        return peer, info["maddrs"][0]

    def trainer(self, name: str, initial_peers: list[str], *sets: str, extra: tuple[str, ...] = (),
                program=None) -> PeerProcess:
        peer_dir = self.workdir / name
        args = ["join", "--config", str(DEBUG_CONFIG), "--status-file", str(peer_dir / "status.json"),
                "--set", f"checkpoint.dir={peer_dir / 'checkpoints'}"]
        joins = initial_peers or any(flag in extra for flag in ("--initial-peers", "--initial-peers-file"))
        args += ["--initial-peers", *initial_peers] if initial_peers else [] if joins else ["--new-swarm"]
        for item in sets:
            args += ["--set", item]
        return self.start(name, args + list(extra), program)

    def monitor(self, name: str, initial_peers: list[str], *sets: str) -> tuple[PeerProcess, str]:
        """A `swarm monitor` on port 0 with its history in ``workdir/<name>.sqlite``; returns it and its URL."""
        url_file = self.workdir / f"{name}.url.json"
        url_file.unlink(missing_ok=True)
        args = ["monitor", "--config", str(DEBUG_CONFIG), "--initial-peers", *initial_peers, "--url-file", str(url_file),
                "--set", "monitor.port=0", "--set", f"monitor.db_path={self.workdir / name}.sqlite"]
        for item in sets:
            args += ["--set", item]
        peer = self.start(name, args)
        info = wait_for(lambda: read_json(url_file), timeout=STARTUP_TIMEOUT, what=f"{name} to serve", alive=[peer])
        return peer, info["url"]

    def container(self, name: str, args: list[str], *, data_dir: Path | None = None,
                  env: dict | None = None) -> ContainerPeer:
        """A peer in a container of the swarm image on the host's network; its state folder is
        ``workdir/name``, so :meth:`status` and :meth:`checkpoint` read it like a process peer's."""
        peer = ContainerPeer(name, args, state_dir=self.workdir / name, data_dir=data_dir, env=env)
        self.processes.append(peer)
        return peer

    def status(self, name: str) -> dict | None:
        return read_json(self.workdir / name / "status.json")

    def epoch(self, name: str) -> int:
        """The trainer's epoch (a round in DiLoCo mode), -1 before it has reported one."""
        status = self.status(name)
        return status["epoch"] if status else -1

    def checkpoint(self, name: str) -> Path:
        return self.workdir / name / "checkpoints" / "latest.pt"

    def teardown(self) -> None:
        for peer in self.processes:
            peer.kill_group()


@contextlib.contextmanager
def running_swarm(workdir: Path, failed: Callable[[], bool]):
    swarm = Swarm(workdir)
    try:
        yield swarm
    finally:
        if failed():  # the logs of every peer are the first thing one wants when a swarm test fails
            for peer in swarm.processes:
                print(f"\n===== {peer.name} (exit {peer.poll()}) =====\n{peer.log_tail(80)}")
        swarm.teardown()


@pytest.fixture
def swarm(tmp_path: Path, request):
    with running_swarm(tmp_path, lambda: getattr(request.node, "rep_call", None) is not None
                       and request.node.rep_call.failed) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def module_swarm(tmp_path_factory, request):
    """One swarm shared by the tests of a module (started by the first test that asks for it)."""
    failures_before = request.session.testsfailed
    with running_swarm(tmp_path_factory.mktemp(request.module.__name__),
                       lambda: request.session.testsfailed > failures_before) as swarm:
        yield swarm


AVERAGING_PEER = (sys.executable, "-m", "harness.averaging_peer")


class Averagers:
    """``python -m harness.averaging_peer`` processes for one test (rounds of the all-reduce with explicit
    fault and attack options): their records, status files and logs are in ``workdir``."""

    def __init__(self, workdir: Path):
        self.workdir, self.peers = workdir, []

    def start(self, index: int, *extra: str, initial: str | None = None) -> PeerProcess:
        args = ["--index", str(index), "--out", str(self.out(index)), "--status", str(self.workdir / f"s{index}.json")]
        if initial is None:
            args += ["--address-file", str(self.workdir / "address.json")]
        else:
            args += ["--initial-peers", initial]
        peer = PeerProcess(f"averager{index}", [*args, *extra], log_path=self.workdir / f"averager{index}.log",
                           program=AVERAGING_PEER, cwd=REPO)
        self.peers.append(peer)
        return peer

    def swarm(self, count: int, *extra: str, extra_for=lambda index: ()) -> list[PeerProcess]:
        """``count`` averagers; ``extra_for(index)`` adds arguments for one of them."""
        first = self.start(0, *extra, *extra_for(0))
        address = wait_for(lambda: read_json(self.workdir / "address.json"), timeout=90, what="the first averager",
                           alive=[first])["maddrs"][0]
        return [first] + [self.start(index, *extra, *extra_for(index), initial=address) for index in range(1, count)]

    def out(self, index: int) -> Path:
        return self.workdir / f"p{index}.jsonl"

    def records(self, index: int) -> dict[int, dict]:
        try:
            lines = self.out(index).read_text().splitlines()
        except OSError:
            return {}
        return {record["round"]: record for record in map(json.loads, lines)}

    def status(self, index: int) -> dict:
        return read_json(self.workdir / f"s{index}.json") or {}


@pytest.fixture
def averagers(tmp_path, request):
    """Averaging peers (:class:`Averagers`), every one killed at teardown; their logs printed if the test failed."""
    group = Averagers(tmp_path)
    yield group
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for peer in group.peers:
            print(f"\n===== {peer.name} (exit {peer.poll()}) =====\n{peer.log_tail(40)}")
    for peer in group.peers:
        peer.kill_group()


# fixtures that start peers as processes
SWARM_FIXTURES = {"swarm", "module_swarm", "averagers"}


def pytest_collection_modifyitems(config, items):
    """Keep the fast lane free of swarms: a test using a fixture that starts peers must be marked ``swarm``."""
    unmarked = [item.nodeid for item in items
                if SWARM_FIXTURES & set(item.fixturenames) and item.get_closest_marker("swarm") is None]
    if unmarked:
        raise pytest.UsageError("these tests start peers but are not marked @pytest.mark.swarm (the slow lane): "
                                + ", ".join(unmarked))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def run_cli(*args: str, timeout: float = 120.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `swarm` command to completion (bad-input tests)."""
    return subprocess.run([sys.executable, "-m", "peers", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
