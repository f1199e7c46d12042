"""What every peer process needs around the library: logging, signals, files, leftover children."""

from __future__ import annotations

import _thread
import json
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import threading
from pathlib import Path

from hivemind.utils.logging import use_hivemind_log_handler

from swarm.errors import SwarmError

logger = logging.getLogger(__name__)


class _PeerTag(logging.Filter):
    """Adds ``record.peer`` (role and short peer id) to every log line."""

    tag = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.peer = self.tag
        return True


_peer_tag = _PeerTag()


def setup_logging(role: str) -> None:
    """Configure logging once per process. Level from SWARM_LOGLEVEL (default INFO); hivemind's own
    messages from SWARM_HIVEMIND_LOGLEVEL (default WARNING; INFO shows every averaging outcome)."""
    level = os.environ.get("SWARM_LOGLEVEL", "INFO").upper()
    use_hivemind_log_handler("nowhere")
    handler = logging.StreamHandler()
    handler.addFilter(_peer_tag)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(peer)s] %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    hivemind_level = os.environ.get("SWARM_HIVEMIND_LOGLEVEL", "WARNING").upper()
    logging.getLogger("hivemind").setLevel(hivemind_level if hivemind_level in logging.getLevelNamesMapping() else "WARNING")
    set_log_peer(role, None)


def set_log_peer(role: str, peer_id: str | None) -> None:
    _peer_tag.tag = f"{role} {peer_id[-6:]}" if peer_id else role


class StopSignals:
    """SIGINT/SIGTERM: the first sets ``event`` so loops finish their step and leave cleanly; if the
    process has not stopped after ``grace`` seconds (or on a second signal), the handler raises
    KeyboardInterrupt in the main thread to break out of a blocking wait."""

    def __init__(self, grace: float = 3.0):
        self.event = threading.Event()
        self.grace = grace
        self._owner_pid = os.getpid()
        self._timer: threading.Timer | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._owner_pid:
            # a forked helper (hivemind's DHT or averager process) inherited this handler: behave as
            # if it had none, so that its parent's terminate() still ends it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not self.event.is_set():
            logger.info(f"received {signal.Signals(signum).name}: leaving the swarm")
            self.event.set()
            self._timer = threading.Timer(self.grace, _thread.interrupt_main)
            self._timer.daemon = True
            self._timer.start()
            return
        raise KeyboardInterrupt

    def disarm(self) -> None:
        """Call once the main loop has returned: shutdown itself must not be interrupted."""
        if self._timer is not None:
            self._timer.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as file:
        json.dump(data, file)
    os.replace(tmp, path)




def check_alive(*components) -> None:
    """Call ``check()`` on each component (None is skipped): a background thread that died raises here,
    in the main loop, after one clear log line, and the peer leaves and exits non-zero (see exit_codes)."""
    for component in components:
        if component is None:
            continue
        try:
            component.check()
        except SwarmError as e:
            logger.error(f"{e}; leaving the swarm")
            raise


def run_bounded(what: str, fn, timeout: float) -> bool:
    """Run ``fn`` in a daemon thread and wait at most ``timeout`` seconds; False if it did not finish."""
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as e:  # reported below, never swallowed
            errors.append(e)

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning(f"{what} did not finish within {timeout:g}s; moving on")
        return False
    if errors:
        logger.warning(f"{what} failed: {errors[0]!r}")
        return False
    return True


def reap_children(timeout: float = 3.0) -> None:
    """Terminate, then kill, any multiprocessing children still alive (averagers, DHT)."""
    children = mp.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join(1.0)
