"""One helper for every periodic background thread of a peer: :class:`PeriodicLoop`.

A periodic loop does one small job (store a record, read the swarm, write a file, ping a peer) every
``period`` seconds in a daemon thread, and gives its owner what every background component owes it
(see STYLE.md, principle 6): :meth:`~PeriodicLoop.start` raises startup errors in the caller's thread,
:attr:`~PeriodicLoop.ready` says the first job is done, :meth:`~PeriodicLoop.check` raises in the
owner's thread the error that killed the loop, and :meth:`~PeriodicLoop.shutdown` stops it and joins
it with a timeout. The thread waits on an Event between iterations, never in ``time.sleep``, so
shutdown and :meth:`~PeriodicLoop.wake` take effect at once.

Which errors end a loop: an iteration that raises one of the loop's ``retry_on`` types (named by its
owner: the transient failures of that job, e.g. a DHT call that timed out) is logged at WARNING with
the exception and tried again at the next period; anything else is a bug or a failure the loop cannot
get past: it ends the loop, is logged at ERROR with its traceback, and :meth:`~PeriodicLoop.check`
raises it (as :class:`~swarm.errors.BackgroundError`) so the peer exits non-zero instead of running
on without the component. A failure once shutdown has begun is expected (the DHT is going away) and
ends the loop quietly.

Not every background thread is periodic: :class:`swarm.averaging.service.AveragingService` runs an
asyncio event loop that serves requests as they come; it has its own ``check`` and bounded shutdown.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from hivemind.utils import get_logger

from swarm.errors import BackgroundError

logger = get_logger(__name__)


class PeriodicLoop:
    """Runs ``iteration()`` every ``period`` seconds in a daemon thread named ``name``.

    :param iteration: one round of the job; it should bound its own blocking calls (a DHT call with a
      timeout), since :meth:`shutdown` cannot interrupt it.
    :param period: seconds between iterations: from the end of one to the start of the next, or from
      start to start with ``from_start`` (a steady rate; a slow iteration is followed at once by the next).
    :param startup: run by :meth:`start` in the caller's thread, before the thread starts (its errors
      are the caller's, and :attr:`ready` is set once it returns).
    :param initial_wait: seconds before the first iteration; default: one period after a ``startup``
      (which did the first round of the job), none without one.
    :param retry_on: the exception types that are transient for this job: logged at WARNING and
      retried at the next period. Any other exception ends the loop (see the module docstring).
    """

    def __init__(self, *, name: str, iteration: Callable[[], None], period: float,
                 startup: Optional[Callable[[], None]] = None, retry_on: tuple[type[BaseException], ...] = (),
                 from_start: bool = False, initial_wait: Optional[float] = None):
        self.name, self.iteration, self.period = name, iteration, period
        self.initial_wait = initial_wait if initial_wait is not None else (0.0 if startup is None else period)
        self.startup, self.retry_on, self.from_start = startup, retry_on, from_start
        self.ready = threading.Event()  # set after startup or the first successful iteration (or on death)
        self.stop = threading.Event()  # set by shutdown()
        self.error: Optional[BaseException] = None  # what ended the loop, if anything did
        self._wakeup = threading.Event()  # set by wake() and shutdown(): the thread waits on it
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "PeriodicLoop":
        """Run ``startup`` here (its errors are raised here, and no thread starts), then the thread."""
        if self.startup is not None:
            self.startup()
            self.ready.set()
        self._thread.start()
        return self

    def wake(self) -> None:
        """Run the next iteration now rather than at the end of the period (once, if called often)."""
        self._wakeup.set()

    def wait_ready(self, timeout: Optional[float]) -> bool:
        """True once ready, False after ``timeout`` seconds. :raises BackgroundError: the loop died."""
        ready = self.ready.wait(timeout)
        self.check()
        return ready

    def check(self) -> None:
        """Call from the owner's thread. :raises BackgroundError: the loop died (its error is the cause)."""
        if self.error is not None:
            raise BackgroundError(f"background loop {self.name!r} died: {self.error!r}") from self.error

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float) -> bool:
        """Stop the loop and wait up to ``timeout`` seconds for an iteration in flight to end.
        Returns whether the thread has ended (a stuck one is left behind: it is a daemon)."""
        self.stop.set()
        self._wakeup.set()
        if not self._thread.is_alive():
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(f"background loop {self.name!r} did not stop within {timeout:g}s; leaving it behind")
            return False
        return True

    def _run(self) -> None:
        wait = self.initial_wait
        while True:
            self._wakeup.wait(wait)
            self._wakeup.clear()  # before the iteration: a wake() during it runs the next one at once
            if self.stop.is_set():
                return
            started = time.monotonic()
            if not self._iterate():
                return
            spent = time.monotonic() - started
            wait = max(0.0, self.period - spent) if self.from_start else self.period

    def _iterate(self) -> bool:
        """One iteration; False if the loop must end."""
        try:
            self.iteration()
        except self.retry_on as e:
            if self.stop.is_set():
                return False
            logger.warning(f"{self.name}: {_describe(e)}; trying again in {self.period:g}s")
            return True
        except BaseException as e:  # raised in the owner's thread by check(), never swallowed
            if self.stop.is_set():
                logger.debug(f"{self.name} failed while shutting down: {e!r}")
                return False
            self.error = e
            logger.error(f"background loop {self.name!r} died; its owner will stop: {e!r}", exc_info=e)
            self.ready.set()  # so that no one waits for a first iteration that will never come
            return False
        self.ready.set()
        return True


def _describe(error: BaseException) -> str:
    # str() rather than repr(): an OSError's str names the file, its repr does not
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
