"""Peers as separate OS processes, for `swarm demo` and the end-to-end tests.

Each peer runs the real CLI (``python -m peers``) in a session of its own, so that the peer, its DHT
process and its ``p2pd`` daemon form one process group that can be inspected and, as a last resort,
killed as a whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


class PeerProcess:
    """One ``swarm`` command (or another ``program``) running as its own process group; output goes
    to ``log_path``."""

    def __init__(self, name: str, args: Sequence[str], *, log_path: Path, env: Optional[dict] = None,
                 program: Sequence[str] = (sys.executable, "-m", "peers"), cwd: Optional[Path] = None):
        self.name, self.args, self.log_path = name, list(args), Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*program, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.pid = self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM the peer and wait; SIGKILL its whole group if it has not left by ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill_group()
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL everything left in the peer's process group (the peer itself included)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def group_members(self) -> list[int]:
        """Live processes of this peer's process group, the peer excluded once it has exited."""
        members = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, pgrp = fields[0], int(fields[2])
            if pgrp == self.pid and state != "Z":
                members.append(int(entry.name))
        return members

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(condition: Callable[[], object], *, timeout: float, what: str, period: float = 0.2,
             alive: Sequence[PeerProcess] = ()) -> object:
    """Poll ``condition`` until it returns something truthy; raise TimeoutError naming ``what``.

    Fails early, with the peer's log tail, if one of the ``alive`` processes exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for peer in alive:
            if peer.poll() is not None:
                raise RuntimeError(f"{peer.name} exited with {peer.poll()} while waiting for {what}:\n{peer.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(period)


def read_json(path: Path) -> Optional[dict]:
    """A JSON file written atomically by a peer, or None if it is not there yet."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path | str, value: object) -> None:
    """Write ``value`` as JSON so that a reader polling with :func:`read_json` never sees half of it."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(value, file)
    os.replace(temporary, path)
