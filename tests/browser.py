"""A real headless Chromium driven over the DevTools protocol (CDP), for tests of the dashboard.

Debian's ``chromium`` is started with a fresh profile and ``--remote-debugging-port=0``; the port it
picked is read from the profile's ``DevToolsActivePort`` file. A small synchronous CDP client (the
``websockets`` package) navigates, evaluates JavaScript, collects console errors and uncaught
exceptions, and takes screenshots. Chromium runs in a session of its own and its whole process group
is killed on :meth:`close`, also when a test fails.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from websockets.sync.client import connect

from harness import processes

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
         "--window-size=1400,1000", "--remote-debugging-port=0", "--remote-allow-origins=*"]


def find_chromium() -> Optional[str]:
    explicit = os.environ.get("SWARM_TEST_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((path for path in CHROMIUM_CANDIDATES if Path(path).is_file()), shutil.which("chromium"))


class Browser:
    """One headless Chromium with one page. Use as a context manager."""

    def __init__(self, executable: str, *, log_path: Path, startup_timeout: float = 60.0):
        self.profile = Path(tempfile.mkdtemp(prefix="swarm-chromium-"))
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.console_errors: list[str] = []
        self._ids = itertools.count(1)
        self._socket = None
        self._stack = contextlib.ExitStack()
        try:
            port = self._wait_for_port(startup_timeout)
            self._socket = self._stack.enter_context(connect(self._page_websocket(port, startup_timeout),
                                                            max_size=64 * 2**20, open_timeout=startup_timeout))
            for method in ("Runtime.enable", "Log.enable", "Page.enable"):
                self.call(method)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        port_file = self.profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}; see {self.log.name}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium did not open its DevTools port within {timeout:g}s")

    @staticmethod
    def _page_websocket(port: int, timeout: float) -> str:
        def first_page() -> Optional[str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
                pages = [target for target in json.load(response) if target.get("type") == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        return processes.wait_for(first_page, timeout=timeout, what="chromium to open a page", period=0.1)

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        """Send one CDP command and return its result; events that arrive meanwhile are recorded."""
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout:g}s")
            message = json.loads(self._socket.recv(timeout=remaining))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            self._record_event(message)

    def _record_event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            texts = [str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])]
            self.console_errors.append("console." + params["type"] + ": " + " ".join(texts))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text", "")
            self.console_errors.append(f"uncaught: {description}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        """Open ``url`` and wait until its document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
                      timeout=timeout, what=f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float, what: str) -> Any:
        """Evaluate ``expression`` until it is truthy (events are collected meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} ({expression} = {value!r})")
            time.sleep(0.25)

    def screenshot(self, *paths: Path) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        for path in paths:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(png)
        return png

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._stack.close()
            except OSError:
                pass
            self._socket = None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # chromium's zygote and renderers, whatever is left
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
