"""The swarm image built and run for real with podman, for tests/test_container.py.

A :class:`ContainerPeer` behaves like :class:`harness.processes.PeerProcess` (``poll``, ``signal``,
``kill_group``, ``log_tail``), so the ``swarm`` fixture starts, waits on and reaps containers the
same way as peer processes. Its state folder (identity key, checkpoints, status file) is a folder of
the test, mounted at the image's /var/lib/swarm, so the test reads its status like any other peer's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Optional, Sequence

ENGINE = "podman"
BASE_IMAGE = os.environ.get("CONTAINER_BASE_IMAGE", "localhost/debian-python3:bookworm")
IMAGE = "localhost/swarm:test"
STATE_DIR = "/var/lib/swarm"  # fixed paths of the image (docker/Dockerfile)
DATA_DIR = "/data"
CONFIGS_DIR = "/opt/swarm/configs"


def podman(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{ENGINE} {' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def unavailable_reason() -> Optional[str]:
    """Why the container test cannot run here, or None if it can."""
    if shutil.which(ENGINE) is None:
        return f"no container engine: {ENGINE} is not installed (.ci/setup-podman installs and sets it up, as root)"
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{ENGINE} is installed but cannot run containers here: {last}"
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        return (f"base image {BASE_IMAGE} is missing: .ci/setup-podman builds it from Debian's packages "
                f"(or set CONTAINER_BASE_IMAGE=python:3.11-slim where a registry is reachable)")
    return None


def build_image(context: Path, *, timeout: float) -> float:
    """``podman build`` the swarm image on BASE_IMAGE; returns the seconds it took.

    pip's settings of this process pass through as the image's build arguments: a CA bundle
    (PIP_CERT) and a local wheel folder (PIP_FIND_LINKS) are mounted into the build. The image pins
    torch by the repository's constraints.txt itself (its default PIP_CONSTRAINT) and takes the CPU
    build; where a local wheel folder holds it, PyTorch's index is not consulted (TORCH_INDEX_URL
    empty) unless TORCH_INDEX_URL names one. The OCI labels get this checkout's version and revision.
    """
    args = ["build", "--format", "docker", "--network", "host", "-f", str(context / "docker" / "Dockerfile"),
            "-t", IMAGE, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "TORCH=cpu"]
    for name, value in build_labels(context).items():
        args += ["--build-arg", f"{name}={value}"]
    if "TORCH_INDEX_URL" in os.environ or os.environ.get("PIP_FIND_LINKS"):
        args += ["--build-arg", f"TORCH_INDEX_URL={os.environ.get('TORCH_INDEX_URL', '')}"]
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        if os.environ.get(name):
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    for name, inside in (("PIP_CERT", "/run/build/ca.crt"), ("PIP_FIND_LINKS", "/run/build/wheels")):
        value = os.environ.get(name)
        if value and Path(value).exists():
            args += ["-v", f"{value}:{inside}:ro", "--build-arg", f"{name}={inside}"]
        elif value:
            args += ["--build-arg", f"{name}={value}"]
    started = time.monotonic()
    podman(*args, str(context), timeout=timeout)
    return time.monotonic() - started


def build_labels(context: Path) -> dict[str, str]:
    """The SOURCE, VERSION and REVISION build arguments (the image's OCI labels) for this checkout."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(context), *args], capture_output=True, text=True, timeout=30)
        return result.stdout.strip() if result.returncode == 0 else ""
    with open(context / "pyproject.toml", "rb") as file:
        version = tomllib.load(file)["project"]["version"]
    return {"SOURCE": git("remote", "get-url", "origin") or f"file://{context}", "VERSION": version,
            "REVISION": git("rev-parse", "HEAD") or "unknown"}


def image_size(image: str = IMAGE) -> int:
    return int(podman("image", "inspect", image, "--format", "{{.Size}}").stdout.strip())


class ContainerPeer:
    """One ``swarm`` command in a container on the host's network, state in ``state_dir``."""

    def __init__(self, name: str, args: Sequence[str], *, state_dir: Path, data_dir: Optional[Path] = None,
                 env: Optional[dict] = None, image: str = IMAGE):
        self.name = f"swarm-test-{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o777)  # the image runs as an unprivileged user of its own
        volumes = ["-v", f"{self.state_dir}:{STATE_DIR}"]
        if data_dir is not None:
            volumes += ["-v", f"{data_dir}:{DATA_DIR}:ro"]
        environment = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        # No systemd here to run health checks on a timer: the test runs them with `podman healthcheck run`.
        try:
            podman("run", "--detach", "--name", self.name, "--network", "host", "--stop-timeout", "30",
                   "--health-interval", "disable", *volumes, *environment, image, *args)
        except BaseException:
            self.kill_group()  # created but not started, or the start timed out: leave nothing behind
            raise

    def poll(self) -> Optional[int]:
        """None while the container runs (or starts); its exit code once it has stopped."""
        state = podman("inspect", self.name, "--format", "{{.State.Status}} {{.State.ExitCode}}", check=False)
        if state.returncode != 0:
            return -1  # removed
        status, code = state.stdout.split()
        return int(code) if status in ("exited", "stopped") else None

    def signal(self, signum: int) -> None:
        podman("kill", "--signal", str(int(signum)), self.name)

    def wait(self, timeout: float) -> int:
        return int(podman("wait", self.name, timeout=timeout).stdout.strip())

    def start(self) -> None:
        podman("start", self.name)

    def healthcheck(self) -> subprocess.CompletedProcess:
        return podman("healthcheck", "run", self.name, check=False)

    def exec(self, *args: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *args, check=False)

    def kill_group(self) -> None:
        """Remove the container, whatever its state (SIGKILL if it still runs)."""
        podman("rm", "--force", "--time", "0", self.name, check=False)

    def log_tail(self, lines: int = 20) -> str:
        logs = podman("logs", "--tail", str(lines), self.name, check=False)
        return (logs.stdout + logs.stderr).strip()
