"""Documented exit codes of the ``swarm`` command (also listed in README.md)."""

from swarm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    ManifestError,
    MonitorError,
    NetworkError,
    SwarmError,
)

OK = 0  # finished, or left the swarm cleanly on SIGINT/SIGTERM
INTERNAL = 1  # a bug or an unexpected failure (a background thread that died included): the traceback is logged
USAGE = 2  # bad command line, config key, config value or multiaddr
UNREACHABLE = 3  # none of the initial peers answered before network.bootstrap_timeout
DATA = 4  # data folder missing, unreadable or without usable text
CHECKPOINT = 5  # checkpoint corrupt, incompatible, missing for --resume, or in the way of a fresh start
MONITOR = 6  # monitor: history database unreadable or of another run, or the dashboard's port is taken
MANIFEST = 7  # run manifest or certificate: missing, forged, expired, revoked, contradicted by the config, or changed
EXPORT = 8  # an export folder missing or not a GPT-2 swarm can run, --out not empty, or the `export` extra missing
DOCTOR = 9  # swarm doctor: a check says joining would not work (each failed check printed with what to do)
INTERRUPTED = 130  # a second SIGINT/SIGTERM cut the clean leave short

_BY_ERROR = {ConfigError: USAGE, NetworkError: UNREACHABLE, DataError: DATA, CheckpointError: CHECKPOINT,
             MonitorError: MONITOR, ManifestError: MANIFEST, ExportError: EXPORT}


def for_error(error: SwarmError) -> int:
    for error_type, code in _BY_ERROR.items():
        if isinstance(error, error_type):
            return code
    return INTERNAL
