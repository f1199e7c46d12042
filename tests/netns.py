"""Several hosts on one machine: network namespaces on a bridge (see shared/ENVIRONMENT.md).

Used by tests that cut a peer's link. Needs root and iproute2; :func:`available` says whether this
machine can do it, so that tests skip with a reason instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 (the ip command) is not installed"
    probe = f"swprobe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return False, f"cannot create a network namespace: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


class Bridge:
    """``count`` hosts 10.78.<net>.1..count, each in its own namespace, joined by a bridge."""

    def __init__(self, count: int):
        self.prefix = f"swp{os.getpid() % 100000}"
        self.net = os.getpid() % 200 + 20
        self.hosts = [f"{self.prefix}h{i}" for i in range(1, count + 1)]
        self.switch = f"{self.prefix}br"
        self._run("ip", "netns", "add", self.switch)
        self._run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts, start=1):
            inside, outside = f"{self.prefix}v{index}", f"{self.prefix}b{index}"
            self._run("ip", "netns", "add", host)
            self._run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            self._run("ip", "link", "set", inside, "netns", host)
            self._run("ip", "link", "set", outside, "netns", self.switch)
            self._run("ip", "-n", self.switch, "link", "set", outside, "master", "br0")
            self._run("ip", "-n", self.switch, "link", "set", outside, "up")
            self._run("ip", "-n", host, "addr", "add", f"{self.address(index - 1)}/24", "dev", inside)
            self._run("ip", "-n", host, "link", "set", inside, "up")
            self._run("ip", "-n", host, "link", "set", "lo", "up")

    def address(self, host: int) -> str:
        return f"10.78.{self.net}.{host + 1}"

    def program(self, host: int) -> tuple[str, ...]:
        """The command prefix that runs the swarm CLI on ``host``."""
        return ("ip", "netns", "exec", self.hosts[host], sys.executable, "-m", "peers")

    def cut(self, host: int) -> None:
        self._run("ip", "-n", self.switch, "link", "set", f"{self.prefix}b{host + 1}", "down")

    def restore(self, host: int) -> None:
        self._run("ip", "-n", self.switch, "link", "set", f"{self.prefix}b{host + 1}", "up")

    def close(self) -> None:
        for namespace in [*self.hosts, self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    @staticmethod
    def _run(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True)
