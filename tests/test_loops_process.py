"""The background loops of a one-process `airlock serve` run in a child process: they do the work, a
child that dies is started again, and stopping the server stops it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from airlock.service import LoopsProcess

from .helpers import Api, job


def _wait(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_loops_process_does_the_work_and_comes_back_after_a_crash(api: Api) -> None:
    first, second = api.submit(job("first"), job("second"))["jobs"]
    v = api.volunteer()
    loops = LoopsProcess(api.gw.settings.model_copy(update={"loop_interval_s": 0.2}))
    loops.start()
    try:
        assert loops.process is not None
        crashed_pid = loops.process.pid
        assert crashed_pid is not None
        (task,) = v.work()
        v.complete(task)
        _wait("the first job to be done", lambda: api.job(first)["state"] == "done")

        os.kill(crashed_pid, signal.SIGKILL)
        _wait(
            "a new loops process",
            lambda: loops.process is not None and loops.process.pid not in (None, crashed_pid),
        )
        (task,) = v.work()
        v.complete(task)
        _wait("the second job to be done by the new process", lambda: api.job(second)["state"] == "done")
    finally:
        loops.stop()
    assert loops.process is not None and not loops.process.is_alive()


def test_stop_right_after_a_crash_starts_nothing_and_leaves_nothing_running(api: Api) -> None:
    loops = LoopsProcess(api.gw.settings)
    loops.start()
    assert loops.process is not None and loops.process.pid is not None
    crashed_pid = loops.process.pid
    os.kill(crashed_pid, signal.SIGKILL)
    time.sleep(0.2)  # the watcher has seen it die and waits RESTART_DELAY_S before starting another
    loops.stop()
    assert loops.process.pid == crashed_pid, "a new loops process was started after stop()"
    assert not loops.process.is_alive() and loops.process.exitcode == -signal.SIGKILL
    assert loops.watcher is not None and not loops.watcher.is_alive()
