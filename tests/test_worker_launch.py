"""celery-fleet-worker: systemd's notify protocol around a real Celery worker and a real redis-server.

What systemd sees (READY=1 only once the worker consumes, WATCHDOG=1 while it may rightly be busy) is
read from a datagram socket of the test's own, as systemd would; the unit-level behaviour (a hung loop
killed and restarted, a long solo task left alone) is proven on real hosts by the Molecule scenarios.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import demo_env

from celery_fleet.notify import Notifier
from celery_fleet.worker import Watchdog, unit_keys

NODE = "probe@launcher"


class Systemd:
    """The notify socket of a pretend service manager: every datagram the worker sends, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def read(self, timeout: float) -> list[dict[str, str]]:
        """Datagrams that arrive within ``timeout`` seconds."""
        got = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            got.append(dict(line.split("=", 1) for line in data.splitlines()))
        self.messages += got
        return got

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.read(0.2):
                if key in message:
                    return message
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")


@pytest.fixture
def systemd(tmp_path):
    manager = Systemd(tmp_path / "notify")
    yield manager
    manager.sock.close()


def launch(env: dict[str, str], systemd: Systemd, watchdog_s: float, node: str = NODE) -> subprocess.Popen:
    argv = [sys.executable, "-m", "celery_fleet.worker", "--app", "demo_app", "worker", f"--hostname={node}"]
    argv += ["--queues=launcher", "--pool=solo", "--without-mingle", "--without-gossip", "--loglevel=INFO"]
    env = {**env, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(worker: subprocess.Popen) -> str:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        _, err = worker.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        _, err = worker.communicate(timeout=10)
    return err


def send(env: dict[str, str], seconds: float, queue: str = "launcher", wait: float | None = None) -> str:
    """Send demo_app.tasks.sleep to ``queue``; with ``wait``, its result (JSON) once it is back."""
    program = (
        "import json, sys; from demo_app.celery import app; "
        f"r = app.send_task('demo_app.tasks.sleep', args=[{seconds}], queue='{queue}'); "
        + (f"print(json.dumps(r.get(timeout={wait})))" if wait else "print(r.id)")
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=(wait or 0) + 60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def result(env: dict[str, str], task_id: str) -> dict:
    """The result of task ``task_id``, read back as a client of the app would (within 60 s)."""
    program = (
        f"from demo_app.celery import app; import json; "
        f"print(json.dumps(app.AsyncResult('{task_id}').get(timeout=60)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def taken(client, node: str) -> None:
    """Wait (up to 30 s) until ``node`` holds a message it has not acknowledged."""
    deadline = time.monotonic() + 30
    while not client.hlen(f"unacked:{node}") and time.monotonic() < deadline:
        time.sleep(0.2)


def test_ready_comes_only_once_the_worker_consumes(redis_server, systemd):
    env = demo_env(redis_server)
    redis_server.stop()
    worker = launch(env, systemd, watchdog_s=2)
    try:
        # The broker is down: the worker keeps trying, says so, and is not ready.
        systemd.wait_for("STATUS", timeout=30)
        assert not [m for m in systemd.read(6) if "READY" in m], systemd.messages
        assert worker.poll() is None
        redis_server.start()
        ready = systemd.wait_for("READY", timeout=60)
        assert ready["STATUS"] == "Consuming launcher"
        # Ready means consuming: a task sent now comes back.
        assert json.loads(send(env, 0.1, wait=30))["slept"] == 0.1
    finally:
        stop(worker)
    systemd.read(0.5)
    assert any("STOPPING" in m for m in systemd.messages), systemd.messages


def test_a_solo_task_longer_than_the_watchdog_keeps_the_pings_coming(redis_server, systemd):
    env = demo_env(redis_server)
    worker = launch(env, systemd, watchdog_s=2)
    try:
        systemd.wait_for("READY", timeout=60)
        send(env, 6)
        # The task holds the solo pool's loop for 6 s, three watchdog intervals; systemd must hear from
        # the worker at least every 2 s all along.
        started = time.monotonic()
        pings = []
        while time.monotonic() - started < 8:
            pings += [time.monotonic() for m in systemd.read(0.5) if m.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in zip([started, *pings], pings, strict=False)]
        assert pings and max(gaps) < 2, gaps
        assert worker.poll() is None
    finally:
        stop(worker)


def test_a_killed_workers_unacknowledged_task_is_handed_back_at_its_restart(redis_server, systemd):
    env = demo_env(redis_server)
    client = redis_server.client()
    first = launch(env, systemd, watchdog_s=30)
    try:
        systemd.wait_for("READY", timeout=60)
        task_id = send(env, 8)
        taken(client, NODE)
        assert client.hlen(f"unacked:{NODE}") == 1, "the worker took the task (acks_late)"
        assert not client.hlen("unacked"), "into the unit's own hash, not kombu's shared one"
    finally:
        first.kill()  # as the watchdog or the OOM killer would: no chance to hand anything back
        first.communicate(timeout=10)
    second = launch(env, systemd, watchdog_s=30)
    try:
        systemd.wait_for("READY", timeout=60)
        assert result(env, task_id)["slept"] == 8
    finally:
        err = stop(second)
    assert "handed 1 message(s)" in err, err[-2000:]
    assert client.hlen(f"unacked:{NODE}") == 0


def test_a_gone_nodes_stale_unacknowledged_task_is_reclaimed_by_another_worker(redis_server, systemd):
    """A node that never starts again: past the visibility timeout, any worker hands its messages back,
    as kombu does for its one shared hash."""
    env = demo_env(redis_server)
    client = redis_server.client()
    gone = launch(env, systemd, watchdog_s=30, node="gone@launcher")
    try:
        systemd.wait_for("READY", timeout=60)
        task_id = send(env, 1)
        taken(client, "gone@launcher")
    finally:
        gone.kill()
        gone.communicate(timeout=10)
    [tag] = client.hkeys("unacked:gone@launcher")
    # Taken two hours ago: past the demo app's visibility timeout (7200 s).
    client.zadd("unacked_index:gone@launcher", {tag: time.time() - 7300})
    other = launch(env, systemd, watchdog_s=30)
    try:
        systemd.wait_for("READY", timeout=60)
        assert result(env, task_id)["worker"] == NODE
    finally:
        stop(other)
    assert client.hlen("unacked:gone@launcher") == 0


# --- the parts, on their own ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, **states) -> None:
        self.sent.append(states)


def test_the_watchdog_pings_while_the_loop_runs_its_ticks_and_stops_when_it_does_not(caplog):
    clock, notifier = Clock(), Recorder()
    dog = Watchdog(notifier, 10, clock=clock)
    dog.consuming = True
    handed: list = []
    for _ in range(8):  # the loop runs each tick it is handed
        clock.now += 2.5
        assert dog.check(lambda tick: (handed.append(tick), tick()))
    assert notifier.sent.count({"WATCHDOG": 1}) == 8
    # The loop hangs: ticks are handed but never run.
    results = []
    for _ in range(4):
        clock.now += 2.5
        results.append(dog.check(handed.append))
    assert results == [True, False, False, False]  # silent from half the interval on
    assert notifier.sent.count({"WATCHDOG": 1}) == 9
    assert caplog.text.count("main loop has run nothing") == 1


@pytest.mark.parametrize("reason", ["a task on the loop's thread", "a reconnect"])
def test_the_watchdog_keeps_pinging_while_the_loop_is_rightly_busy(reason):
    clock, notifier = Clock(), Recorder()
    dog = Watchdog(notifier, 10, clock=clock)
    dog.consuming = True
    dog.loop_thread = __import__("threading").get_ident()
    if reason == "a reconnect":
        dog.consuming = False
    else:
        dog.task_started()
    for _ in range(40):  # 100 s without a tick run
        clock.now += 2.5
        assert dog.check(lambda _tick: None)
    dog.task_ended()
    dog.consuming = True
    clock.now += 5
    assert not dog.check(lambda _tick: None)


def test_a_task_on_another_thread_does_not_hold_the_loop():
    dog = Watchdog(Recorder(), 10, clock=Clock())
    dog.loop_thread = -1  # not this thread: a threads pool's worker thread
    dog.task_started()
    assert dog.tasks_on_loop == 0


def test_each_node_keeps_its_unacknowledged_messages_under_its_own_keys():
    assert unit_keys({}, "high.a@host1") == {
        "unacked_key": "unacked:high.a@host1",
        "unacked_index_key": "unacked_index:high.a@host1",
        "unacked_mutex_key": "unacked_mutex:high.a@host1",
    }
    # The app's own transport options stay, and its own key names are kept as the prefix.
    options = unit_keys({"visibility_timeout": 7200, "unacked_key": "app_unacked"}, "n@h")
    assert options["visibility_timeout"] == 7200
    assert options["unacked_key"] == "app_unacked:n@h"


def test_the_notifier_speaks_only_for_the_process_systemd_started(systemd):
    environ = {
        "NOTIFY_SOCKET": str(systemd.path),
        "WATCHDOG_USEC": "4000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    notifier = Notifier(environ)
    assert environ == {}, "task code (and forked children) cannot speak for the unit"
    assert notifier.watchdog == 4.0
    notifier.send(READY=1, STATUS="Consuming a, b")
    assert systemd.read(1) == [{"READY": "1", "STATUS": "Consuming a, b"}]
    pid = os.fork()
    if pid == 0:  # a prefork child inherits the socket, but says nothing
        notifier.send(WATCHDOG=1)
        os._exit(0)
    os.waitpid(pid, 0)
    assert systemd.read(0.5) == []
    assert (
        Notifier({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog
        is None
    )
    assert not Notifier({}).enabled
