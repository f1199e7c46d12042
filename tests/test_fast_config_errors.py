"""A config mistake is answered before hivemind or torch is imported (those take seconds to load).

Each case runs the real `swarm` command under ``python -X importtime``, which lists on stderr every
module the process imported; the last line of stderr is still the error.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DEBUG_CONFIG, REPO
from peers import exit_codes
from test_bad_input import assert_one_clear_line

HEAVY = ("torch", "hivemind")


def run_traced(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `swarm ARGS`; return the result and the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "peers", *args], capture_output=True,
                            text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "peers" in imported, "-X importtime printed nothing: the check below would prove nothing"
    return result, imported


CASES = {
    "unknown key": (("join", "--config", str(DEBUG_CONFIG), "--set", "averaging.bogus=1"),
                    ("unknown key 'averaging.bogus'", "accepted here")),
    "wrong value": (("join", "--config", str(DEBUG_CONFIG), "--set", "training.batch_size=lots"),
                    ("training.batch_size", "'lots'")),
    "missing config file": (("bootstrap", "--config", "/nonexistent/swarm.yaml"), ("/nonexistent/swarm.yaml",)),
    "malformed multiaddr": (("status", "--initial-peers", "/ip4/1.2.3/tcp/1"), ("malformed multiaddr",)),
    "malformed run fingerprint": (("join", "--config", str(DEBUG_CONFIG), "--new-swarm", "--run", "QmNotARun"),
                                  ("--run 'QmNotARun' is not a run fingerprint",)),
    "join without peers": (("join", "--config", str(DEBUG_CONFIG)), ("no initial peers", "--new-swarm")),
    "demo, unknown key": (("demo", "--set", "training.bogus=1"), ("unknown key 'training.bogus'",)),
    "demo, bad peer count": (("demo", "--peers", "0"), ("--peers must be between 1 and 8",)),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES)
def test_config_error_comes_before_heavy_imports(case):
    args, fragments = CASES[case]
    result, imported = run_traced(*args)
    assert_one_clear_line(result, exit_codes.USAGE, *fragments)
    assert not imported & set(HEAVY), f"imported {sorted(imported & set(HEAVY))} before reporting a config error"


@pytest.mark.timeout(60)
def test_config_package_imports_no_heavy_module():
    code = "import sys, swarm.config.loading, swarm.config.schema, swarm.config.multiaddrs, peers.cli; " \
           f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
