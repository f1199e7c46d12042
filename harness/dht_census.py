"""Run a ``swarm`` command with its DHT requests counted: which key each find and store served, and their bytes.

    python -m harness.dht_census CENSUS_PREFIX <swarm command line, e.g. join --config ...>

Wraps hivemind's server-side handlers of find and store requests (``DHTProtocol.rpc_find`` and
``rpc_store``, in whatever process the DHT forks) before the peer starts, and every two seconds writes
``CENSUS_PREFIX.<pid>.json``: ``{"find <key>": [requests, request bytes, response bytes], ...}`` with
``<key>`` the name of the :mod:`swarm.net.keys` function whose key (for run ``--run-id``, default the
debug config's) the request named, or ``other``. Bytes are protobuf message sizes, before libp2p's
framing and encryption. A measuring tool for benchmarks (``benchmarks/control_traffic.py --census``):
nothing in swarm imports it.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID

from swarm.net import keys

PERIOD = 2.0


def read_census(folder: Path) -> dict[str, list[int]]:
    """What every node run under this tool with a prefix in ``folder`` served so far: ``{"find <key>":
    [requests, request bytes, response bytes], ...}`` summed over the nodes."""
    total: dict[str, list[int]] = {}
    for path in folder.glob("census.*.json"):
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name, values in counts.items():
            total[name] = [a + b for a, b in zip(total.get(name, [0, 0, 0]), values)]
    return total


def census_command(folder: Path) -> list[str]:
    """The start of a command line that runs a ``swarm`` command (its arguments follow) counted, with prefix
    ``folder``/census (what :func:`read_census` reads)."""
    return [sys.executable, "-m", "harness.dht_census", str(folder / "census")]


def key_names(run_id: str) -> dict[bytes, str]:
    """DHT key id -> the name of the :mod:`swarm.net.keys` function that makes it for ``run_id``."""
    names = {}
    for name in ("diloco_peers", "diloco_ready", "exclusions", "metrics_key"):
        names[DHTID.generate(source=getattr(keys, name)(run_id)).to_bytes()] = name
    return names


class Census:
    def __init__(self, prefix: str, names: dict[bytes, str]):
        self.prefix, self.names = prefix, names
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self._writer_pid = None

    def wrap(self, kind: str) -> None:
        handler = getattr(DHTProtocol, f"rpc_{kind}")

        @functools.wraps(handler)  # hivemind finds the request and response types in the annotations
        async def counted(protocol, request, context):
            response = await handler(protocol, request, context)
            self._ensure_writer()
            names = sorted({self.names.get(key, "other") for key in request.keys})
            entry = self.counts[f"{kind} {','.join(names) or '-'}"]
            entry[0] += 1
            entry[1] += request.ByteSize()
            entry[2] += response.ByteSize()
            return response

        setattr(DHTProtocol, f"rpc_{kind}", counted)

    def _ensure_writer(self) -> None:
        """The handlers run in the DHT's own process: its writer thread starts there, at the first request."""
        if self._writer_pid != os.getpid():
            self._writer_pid = os.getpid()
            threading.Thread(target=self._write_forever, daemon=True).start()

    def _write_forever(self) -> None:
        path = f"{self.prefix}.{os.getpid()}.json"
        while True:
            time.sleep(PERIOD)
            snapshot = {name: list(entry) for name, entry in list(self.counts.items())}
            with open(path + ".tmp", "w") as file:
                json.dump(snapshot, file)
            os.replace(path + ".tmp", path)


def main() -> None:
    prefix, command = sys.argv[1], sys.argv[2:]
    run_id = command[command.index("--run-id") + 1] if "--run-id" in command else "swarm-debug"
    census = Census(prefix, key_names(run_id))
    for kind in ("find", "store"):
        census.wrap(kind)
    sys.argv = ["swarm", *command]
    runpy.run_module("peers", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
