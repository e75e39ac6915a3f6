"""The ``celery beat`` child of the lease supervisor: started in its own process group, watched, stopped.

Beat runs as a child in a new session, so stopping it reaches every process it started. Its fence (see
``celery_fleet.beat_fence``) learns the lease from the environment given here, and writes a heartbeat
on each tick; :meth:`BeatProcess.silent_for` is how long beat has not ticked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from celery_fleet.beat_fence import read_stamp


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: its pid keeps reserving the process group id."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


class BeatProcess:
    """One run of beat: ``argv`` with ``env``, its heartbeat in ``heartbeat_file``."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], heartbeat_file: Path) -> None:
        self.heartbeat_file = heartbeat_file
        with contextlib.suppress(FileNotFoundError):
            heartbeat_file.unlink()  # a tick of an earlier beat is not one of this beat's
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.pid = self.proc.pid

    def has_exited(self) -> bool:
        return _has_exited(self.pid)

    def silent_for(self) -> float:
        """Seconds since beat's last tick (since its start, before the first one)."""
        return time.monotonic() - max(self.started, read_stamp(self.heartbeat_file))

    def stop(self, grace: float, keep_going: Callable[[], bool] = lambda: True) -> int:
        """SIGTERM beat's process group, SIGKILL it after ``grace`` seconds (or as soon as ``keep_going``
        says no), reap beat; returns its exit status.

        The group is SIGKILLed even after beat exited, before reaping it, to catch stragglers while
        beat's zombie still reserves the group id.
        """
        _signal_group(self.pid, signal.SIGTERM)
        give_up_at = time.monotonic() + grace
        while not self.has_exited() and time.monotonic() < give_up_at and keep_going():
            time.sleep(0.05)
        _signal_group(self.pid, signal.SIGKILL)
        return self.proc.wait()
