"""The periodic-loop helper every background thread runs on: errors reach the owner, shutdown is
bounded and prompt, ready means what it says, and nothing sleeps; and the owners' side of it."""

from __future__ import annotations

import logging
import threading
import time

import hivemind
import pytest

from harness.processes import wait_for
from peers import exit_codes
from peers.lifecycle import check_alive
from swarm.averaging.service import AveragingService
from swarm.errors import BackgroundError
from swarm.loops import PeriodicLoop
from swarm.net.dht import DHT_CALL_FAILURES

LONG = 3600.0  # a period no test waits out


class Counter:
    """An iteration that counts its calls and raises the next error of ``errors``, if any."""

    def __init__(self, *errors: BaseException):
        self.calls, self.errors = 0, list(errors)

    def __call__(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


@pytest.mark.timeout(20)
def test_an_error_that_kills_the_loop_reaches_check_in_the_owners_thread(caplog):
    loop = PeriodicLoop(name="doomed", iteration=Counter(RuntimeError("boom")), period=0.01).start()
    wait_for(lambda: not loop.is_alive(), timeout=10, what="the loop to die")
    with pytest.raises(BackgroundError, match="doomed.*boom") as raised:
        loop.check()
    assert isinstance(raised.value.__cause__, RuntimeError)
    with pytest.raises(BackgroundError):
        loop.wait_ready(1.0)  # a waiter is woken and told, not left to time out
    assert any(r.levelno == logging.ERROR and "doomed" in r.getMessage() for r in caplog.records)
    assert loop.shutdown(timeout=1.0)


@pytest.mark.timeout(20)
def test_a_transient_error_is_logged_at_warning_and_retried(caplog):
    iteration = Counter(TimeoutError("the DHT did not answer"))
    loop = PeriodicLoop(name="flaky", iteration=iteration, period=0.01, retry_on=(TimeoutError,)).start()
    try:
        assert loop.wait_ready(10.0), "ready comes with the first successful iteration"
        assert iteration.calls >= 2
        loop.check()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "flaky" in r.getMessage()]
        assert warnings and "the DHT did not answer" in warnings[0].getMessage()
    finally:
        assert loop.shutdown(timeout=5.0)


@pytest.mark.timeout(20)
def test_a_dht_call_destroyed_in_the_dht_process_is_retried_where_named():
    """hivemind hands a GeneratorExit on through a DHT call's future when the garbage collector ends the
    call's task inside the DHT process: a BaseException, retried only by loops that name it."""
    iteration = Counter(GeneratorExit())
    loop = PeriodicLoop(name="dht-caller", iteration=iteration, period=0.01, retry_on=DHT_CALL_FAILURES).start()
    try:
        assert loop.wait_ready(10.0) and iteration.calls >= 2
    finally:
        assert loop.shutdown(timeout=5.0)


@pytest.mark.timeout(20)
def test_ready_waits_for_the_first_successful_iteration():
    gate = threading.Event()
    loop = PeriodicLoop(name="gated", iteration=lambda: gate.wait(10), period=LONG).start()
    try:
        assert not loop.wait_ready(0.2)
        gate.set()
        assert loop.wait_ready(10.0)
    finally:
        assert loop.shutdown(timeout=5.0)


@pytest.mark.timeout(20)
def test_startup_runs_in_the_callers_thread_and_its_error_is_the_callers():
    def failing_startup():
        raise ValueError("cannot start")

    iteration = Counter()
    loop = PeriodicLoop(name="bad-start", iteration=iteration, period=0.01, startup=failing_startup)
    with pytest.raises(ValueError, match="cannot start"):
        loop.start()
    assert not loop.is_alive() and not loop.ready.is_set() and iteration.calls == 0

    threads = []
    loop = PeriodicLoop(name="good-start", iteration=iteration, period=LONG,
                        startup=lambda: threads.append(threading.current_thread())).start()
    try:
        assert threads == [threading.current_thread()] and loop.ready.is_set()
        assert iteration.calls == 0, "after a startup, the first iteration waits one period"
    finally:
        assert loop.shutdown(timeout=5.0)


@pytest.mark.timeout(20)
def test_shutdown_is_prompt_however_long_the_period():
    iteration = Counter()
    loop = PeriodicLoop(name="idle", iteration=iteration, period=LONG).start()
    assert loop.wait_ready(10.0)
    started = time.monotonic()
    assert loop.shutdown(timeout=5.0)
    assert time.monotonic() - started < 5.0 and not loop.is_alive()  # not the hour-long period (generous: CI is loaded)
    assert iteration.calls == 1
    loop.check()  # a clean stop is not an error


@pytest.mark.timeout(20)
def test_shutdown_gives_up_on_a_stuck_iteration_within_its_timeout(caplog):
    release = threading.Event()
    loop = PeriodicLoop(name="stuck", iteration=lambda: release.wait(30), period=LONG).start()
    try:
        started = time.monotonic()
        assert not loop.shutdown(timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3.0
        assert any(r.levelno == logging.WARNING and "stuck" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
    wait_for(lambda: not loop.is_alive(), timeout=10, what="the released loop to end")


@pytest.mark.timeout(20)
def test_a_failure_during_shutdown_ends_the_loop_quietly(caplog):
    entered, release = threading.Event(), threading.Event()

    def iteration():
        entered.set()
        release.wait(10)
        raise OSError("the DHT went away")

    loop = PeriodicLoop(name="closing", iteration=iteration, period=LONG).start()
    assert entered.wait(10)
    loop.stop.set()
    release.set()
    assert loop.shutdown(timeout=5.0)
    loop.check()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.timeout(20)
def test_wake_runs_the_next_iteration_now():
    iteration = Counter()
    loop = PeriodicLoop(name="woken", iteration=iteration, period=LONG).start()
    try:
        wait_for(lambda: iteration.calls == 1, timeout=10, what="the first iteration")
        loop.wake()
        wait_for(lambda: iteration.calls == 2, timeout=10, what="the woken iteration")
    finally:
        assert loop.shutdown(timeout=5.0)


@pytest.mark.timeout(20)
def test_the_loop_waits_on_an_event_and_never_sleeps(monkeypatch):
    def no_sleep(seconds):
        raise AssertionError(f"time.sleep({seconds}) in a background loop")

    iteration = Counter()
    monkeypatch.setattr(time, "sleep", no_sleep)
    loop = PeriodicLoop(name="sleepless", iteration=iteration, period=0.01, from_start=True).start()
    deadline = time.monotonic() + 10
    while iteration.calls < 5 and time.monotonic() < deadline:
        loop.stop.wait(0.01)  # this test must not sleep either: time.sleep is patched
    assert iteration.calls >= 5
    assert loop.shutdown(timeout=5.0)
    loop.check()


@pytest.mark.timeout(20)
def test_a_peer_checking_a_dead_loop_logs_one_line_and_exits_non_zero(caplog):
    loop = PeriodicLoop(name="doomed", iteration=Counter(RuntimeError("boom")), period=LONG).start()
    wait_for(lambda: not loop.is_alive(), timeout=10, what="the loop to die")
    with pytest.raises(BackgroundError) as raised:
        check_alive(None, loop)
    assert exit_codes.for_error(raised.value) != exit_codes.OK
    assert any(r.levelno == logging.ERROR and "leaving the swarm" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_the_averaging_service_check_raises_once_its_event_loop_died():
    """Not a periodic loop (an asyncio loop serving requests), but its owner checks it the same way."""
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        service = AveragingService(dht=dht, run_id="loops-test", chunk_timeout=2.0, request_timeout=1.0)
        service.check()  # not started yet: nothing to report
        service.start()
        service.check()
        service._loop.call_soon_threadsafe(service._loop.stop)  # the seam: the loop ends under the service
        wait_for(lambda: not service._thread.is_alive(), timeout=10, what="the service's thread to end")
        with pytest.raises(BackgroundError, match="averaging service"):
            service.check()
        service.shutdown(timeout=1.0)
        service.check()  # once shut down, a stopped thread is expected
        # what shutdown cannot do on a dead thread: let hivemind's tasks on that loop end, then close it
        service._loop.run_until_complete(service._stop())
        service._loop.close()
    finally:
        dht.shutdown()
