"""The beat lease supervisor against a real redis-server: one beat fleet-wide, failover, no stale dispatch.

The supervisors run as real processes. Their child is a small script standing in for ``celery beat``: it
appends ``tick <pid> <monotonic>`` to a shared file every 0.2 s, but only while the same fence check
that ``LeaseScheduler`` makes allows it, so a tick is a "dispatch". The fence class itself is tested
in-process on a scheduler that records instead of sending.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, beat
from conftest import free_port
from kombu.utils.imports import symbol_by_name
from prometheus_client.parser import text_string_to_metric_families

from celery_fleet import beat_fence, beat_guard, beat_lease

SRC = Path(__file__).resolve().parent.parent / "src"
KEY = beat_guard.DEFAULT_LOCK_KEY
TTL, RENEW, POLL = 3.0, 1.0, 0.2
TIMING = ["--ttl", str(TTL), "--renew-interval", str(RENEW), "--poll-interval", str(POLL)]
# Losing the lease kills the child within one renewal (1 s) plus the SIGTERM grace (0.5 s), plus slack.
LOSS_BOUND = 3.0

CHILD = """\
import os, signal, sys, time
from celery_fleet.beat_fence import heartbeat, lease_is_valid

def write(line):
    with open(sys.argv[1], "a", encoding="utf-8") as f:
        f.write(line + "\\n")

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
write(f"start {os.getpid()} {time.monotonic()!r}")
while True:
    heartbeat()
    if lease_is_valid():
        write(f"tick {os.getpid()} {time.monotonic()!r}")
    time.sleep(0.2)
"""


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass; bounded in time and count."""
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def holds_for(predicate: Callable[[], Any], duration: float, interval: float = 0.1) -> bool:
    """Whether ``predicate`` stays truthy at every sample over ``duration`` seconds."""
    for _ in range(int(duration / interval) + 1):
        if not predicate():
            return False
        time.sleep(interval)
    return True


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state[0] not in "ZX"


def live_children(*parents: int) -> dict[int, list[int]]:
    """Running (not zombie) children of each parent pid, read from /proc."""
    found: dict[int, list[int]] = {p: [] for p in parents}
    for entry in os.listdir("/proc"):
        state = proc_state(int(entry)) if entry.isdigit() else None
        if state is not None and state[1] in found and state[0] not in "ZX":
            found[state[1]].append(int(entry))
    return found


class Guard:
    """One supervisor process with its stderr in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], state_file: Path, stderr_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.state_file = state_file
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def children(self) -> list[int]:
        return live_children(self.pid)[self.pid]

    def only_child(self) -> int | None:
        kids = self.children()
        return kids[0] if len(kids) == 1 else None

    def deadline(self) -> float:
        return float(self.state_file.read_text())


class Fleet:
    """Supervisors on one machine standing in for hosts, sharing one "dispatch" log."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.script = tmp_path / "fake_beat.py"
        self.script.write_text(CHILD)
        self.out = tmp_path / "dispatches.log"
        self.out.touch()
        self.guards: list[Guard] = []

    def start(self, name: str, url: str | None, *extra: str, command: list[str] | None = None) -> Guard:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        env.pop("CELERY_BROKER_URL", None)
        if url is not None:
            env["CELERY_BROKER_URL"] = url
        state_file = self.dir / name / "lease"  # the directory does not exist yet: the guard makes it
        stderr_path = self.dir / f"{name}.stderr"
        argv = [sys.executable, "-m", "celery_fleet.beat_guard", *TIMING, "--state-file", str(state_file)]
        argv += [*extra, "--", *(command or [sys.executable, str(self.script), str(self.out)])]
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        guard = Guard(proc, state_file, stderr_path)
        self.guards.append(guard)
        return guard

    def events(self) -> list[tuple[str, int, float]]:
        rows = []
        for line in self.out.read_text().splitlines():
            kind, pid, stamp = line.split()
            rows.append((kind, int(pid), float(stamp)))
        return rows

    def ticks(self, pid: int) -> list[float]:
        return [stamp for kind, p, stamp in self.events() if kind == "tick" and p == pid]

    def children(self) -> list[int]:
        """Every running child of every supervisor."""
        found = live_children(*(g.pid for g in self.guards))
        return [pid for kids in found.values() for pid in kids]

    def cleanup(self) -> None:
        """Kill every supervisor and every fake beat they started, stopped ones included.

        Fake beats are found by their script path, unique to this test, so that one spawned just
        before teardown, which has not logged its start yet, is not left behind.
        """
        for guard in self.guards:
            if guard.proc.poll() is None:
                os.kill(guard.pid, signal.SIGCONT)
                guard.proc.kill()
            guard.proc.wait(timeout=10)
        for _ in range(2):  # a second pass catches a child that was between fork and exec
            for pid in self.fake_beats():
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, sig)
            time.sleep(0.1)

    def fake_beats(self) -> list[int]:
        marker = str(self.script).encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and alive(int(entry)):
                with contextlib.suppress(OSError):
                    if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                        pids.append(int(entry))
        return pids


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.cleanup()


def holder(client: redis.Redis) -> int | None:
    """The pid named by the lease's value, or None when nobody holds it."""
    value = client.get(KEY)
    match = re.search(rb"\bpid=(\d+)", value or b"")
    return int(match.group(1)) if match else None


def wait_for_leader(client: redis.Redis, guard: Guard, timeout: float = 10.0) -> int:
    """Wait until ``guard`` holds the lease and its fake beat dispatches; returns the child's pid."""
    assert wait_until(lambda: holder(client) == guard.pid and guard.only_child(), timeout), guard.stderr()
    child = guard.only_child()
    assert child is not None
    return child


def test_leader_holds_renews_and_releases_the_lease(redis_server, fleet, tmp_path):
    env_file = tmp_path / "broker.env"
    env_file.write_text(f'# as the beat unit reads it\nCELERY_BROKER_URL="{redis_server.url}"\n')
    guard = fleet.start("a", None, "--env-file", str(env_file))
    client = redis_server.client()
    child = wait_for_leader(client, guard)
    assert wait_until(lambda: fleet.ticks(child), 5)

    token = client.get(KEY).decode()
    assert f"host={socket.gethostname()} pid={guard.pid} since=" in token

    # For longer than a TTL the key never expires and keeps its holder: its TTL goes back up each renewal.
    pttls = []
    for _ in range(int((TTL + 0.5) / 0.2)):
        assert client.get(KEY) == token.encode()
        pttls.append(client.pttl(KEY))
        time.sleep(0.2)
    assert min(pttls) > 0
    assert sum(later > earlier for earlier, later in itertools.pairwise(pttls)) >= 2
    assert guard.children() == [child]
    assert guard.deadline() > time.monotonic()

    guard.proc.send_signal(signal.SIGTERM)
    assert guard.proc.wait(timeout=15) == 0
    assert client.exists(KEY) == 0
    assert not alive(child)
    assert guard.deadline() == 0
    assert "became leader" in guard.stderr()
    assert redis_server.password not in guard.stderr()


def test_stolen_or_deleted_lease_stops_beat_and_the_guard_leads_again_later(redis_server, fleet):
    client = redis_server.client()
    guard = fleet.start("a", redis_server.url)
    first = wait_for_leader(client, guard)

    client.set(KEY, "host=intruder pid=1 since=now", px=60_000)
    assert wait_until(lambda: not alive(first), LOSS_BOUND)
    assert wait_until(lambda: "lost leadership" in guard.stderr(), 2)
    assert holds_for(lambda: not guard.children() and guard.proc.poll() is None, 0.6)
    assert client.get(KEY) == b"host=intruder pid=1 since=now"

    client.delete(KEY)  # the intruder is gone: the standby takes the lease again
    second = wait_for_leader(client, guard)
    assert second != first

    client.delete(KEY)  # the lease expires under the leader
    assert wait_until(lambda: not alive(second), LOSS_BOUND)
    third = wait_for_leader(client, guard)
    assert third not in (first, second)


def test_frozen_leader_is_replaced_and_never_dispatches_after_resuming(redis_server, fleet):
    client = redis_server.client()
    old = fleet.start("old", redis_server.url)
    old_child = wait_for_leader(client, old)
    assert wait_until(lambda: fleet.ticks(old_child), 5)
    new = fleet.start("new", redis_server.url)
    assert wait_until(lambda: "standing by" in new.stderr(), 10)

    # The whole "host" pauses: the supervisor and beat's process group.
    os.kill(old.pid, signal.SIGSTOP)
    os.killpg(old_child, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        new_child = wait_for_leader(client, new, timeout=TTL + 5)
        assert wait_until(lambda: fleet.ticks(new_child), 5)
    finally:
        # Resume beat first: the worst case, it runs before its supervisor can kill it.
        os.killpg(old_child, signal.SIGCONT)
        os.kill(old.pid, signal.SIGCONT)

    assert wait_until(lambda: not alive(old_child), 3.0)
    assert wait_until(lambda: "lost leadership" in old.stderr(), 3)
    assert max(fleet.ticks(old_child)) < frozen_at  # not a single dispatch after the freeze
    first_new_tick = next(i for i, e in enumerate(fleet.events()) if e[:2] == ("tick", new_child))
    assert all(e[1] != old_child for e in fleet.events()[first_new_tick:])
    # The old leader is a standby again; the new one keeps leading.
    assert holds_for(lambda: old.proc.poll() is None and not old.children(), 0.6)
    assert holder(client) == new.pid
    assert new.children() == [new_child]


def test_redis_restart_never_leaves_two_beats_running(redis_server, fleet):
    guards = [fleet.start("a", redis_server.url), fleet.start("b", redis_server.url)]
    client = redis_server.client()
    assert wait_until(lambda: all("standing by" in g.stderr() for g in guards), 10)
    assert wait_until(lambda: holder(client) in {g.pid for g in guards} and len(fleet.children()) == 1, 15)
    before = fleet.children()

    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(len(fleet.children()))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        redis_server.stop()
        redis_server.start()  # same port and password, no persistence: the lease key is gone
        # A supervisor that meets the new server first (say its host just booted) must not lead
        # while the old leader may still run beat either.
        guards.append(fleet.start("fresh", redis_server.url))
        client = redis_server.client()
        assert wait_until(
            lambda: (
                holder(client) in {g.pid for g in guards}
                and len(kids := fleet.children()) == 1
                and kids != before
            ),
            TTL + 10,
        )
        time.sleep(0.6)  # keep sampling a while after the takeover
    finally:
        done.set()
        sampler.join(timeout=5)
    assert len(samples) > 10
    assert max(samples) <= 1
    assert any("Redis restarted" in g.stderr() for g in guards[:2])
    assert "Redis started recently" in guards[2].stderr()


def leader_and_standby(client, redis_server, fleet) -> tuple[Guard, Guard]:
    """Guard a, leading, and guard b, standing by."""
    leader = fleet.start("a", redis_server.url)
    wait_for_leader(client, leader)
    standby = fleet.start("b", redis_server.url)
    assert wait_until(lambda: "standing by" in standby.stderr(), 10)
    return leader, standby


def leader_metrics(guard: Guard) -> dict[str, float]:
    """What node exporter's textfile collector reads from this guard."""
    text = guard.state_file.with_name("metrics.prom").read_text()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_host_tells_prometheus_whether_it_leads_and_until_when(redis_server, fleet):
    client = redis_server.client()
    leader, standby = leader_and_standby(client, redis_server, fleet)
    assert leader_metrics(standby) == {
        "celery_fleet_beat_leader": 0,
        "celery_fleet_beat_leader_until_seconds": 0,
    }
    led = leader_metrics(leader)
    assert led["celery_fleet_beat_leader"] == 1
    # Until its deadline: less than a TTL ahead, and moved on by each renewal.
    assert time.time() < led["celery_fleet_beat_leader_until_seconds"] < time.time() + TTL
    assert wait_until(
        lambda: (
            leader_metrics(leader)["celery_fleet_beat_leader_until_seconds"]
            > led["celery_fleet_beat_leader_until_seconds"]
        ),
        TTL,
    )
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.proc.wait(timeout=10) == 0
    assert leader_metrics(leader)["celery_fleet_beat_leader"] == 0
    assert wait_until(lambda: leader_metrics(standby)["celery_fleet_beat_leader"] == 1, 5)


def test_clean_stop_hands_over_within_three_seconds(redis_server, fleet):
    client = redis_server.client()
    leader, standby = leader_and_standby(client, redis_server, fleet)

    stopped_at = time.monotonic()
    leader.proc.send_signal(signal.SIGTERM)
    assert wait_until(standby.children, 5)
    handover = time.monotonic() - stopped_at
    assert handover < 3.0  # the product's promise: clean-stop handover <= 3 s
    assert leader.proc.wait(timeout=10) == 0
    assert holder(client) == standby.pid


def test_paused_redis_stops_beat_before_the_lease_could_expire(redis_server, fleet):
    client = redis_server.client()
    guard = fleet.start("a", redis_server.url)
    child = wait_for_leader(client, guard)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        assert wait_until(lambda: not alive(child), TTL + 3)
        # The last renewal was sent before the pause, so beat must be gone before Redis could expire it.
        assert time.monotonic() - paused_at < TTL
        assert holds_for(lambda: not guard.children(), 0.6)
        # A hung broker does not hang the supervisor: it still stops promptly.
        guard.proc.send_signal(signal.SIGTERM)
        assert guard.proc.wait(timeout=10) == 0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert max(fleet.ticks(child), default=0.0) < paused_at + TTL
    assert "Redis unreachable while leading" in guard.stderr() or "deadline passed" in guard.stderr()


def test_beat_exiting_by_itself_releases_the_lease_and_fails_the_unit(redis_server, fleet):
    client = redis_server.client()
    guard = fleet.start("a", redis_server.url, command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    assert guard.proc.wait(timeout=15) == 1  # systemd restarts the unit
    assert client.exists(KEY) == 0  # released at once, not left to expire
    assert guard.deadline() == 0
    assert "beat exited by itself with code 3" in guard.stderr()


def test_unreachable_redis_never_starts_beat(fleet):
    password = secrets.token_hex(16)
    guard = fleet.start("a", f"redis://:{password}@127.0.0.1:{free_port()}/0")
    assert wait_until(lambda: "unreachable" in guard.stderr(), 10)
    assert holds_for(lambda: not guard.children() and guard.proc.poll() is None, 2.0)
    assert fleet.events() == []
    guard.proc.send_signal(signal.SIGTERM)
    assert guard.proc.wait(timeout=10) == 0
    stderr = guard.stderr()
    assert "Redis unreachable: no beat runs on this host until the lease is held" in stderr
    assert password not in stderr


def test_renew_interval_of_half_the_ttl_or_more_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "CELERY_BROKER_URL": "redis://:pw@127.0.0.1:1/0"}
    argv = [sys.executable, "-m", "celery_fleet.beat_guard", "--ttl", "4", "--renew-interval", "2"]
    argv += ["--state-file", str(tmp_path / "lease"), "--", "celery", "beat"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "--renew-interval must be > 0 and < --ttl/2" in result.stderr
    assert not (tmp_path / "lease").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--renew-interval", "0", "--", "celery", "beat"], "--renew-interval must be > 0"),
        (["--ttl", "1", "--renew-interval", "0.4", "--", "celery", "beat"], "--ttl must be at least"),
        (["--poll-interval", "0", "--", "celery", "beat"], "--poll-interval must be > 0"),
        ([], "give the beat command after --"),
        (["--", "celery", "beat", "-S", "redbeat.RedBeatScheduler"], "do not pass --scheduler"),
    ],
)
def test_invalid_settings_exit_2_with_a_message(monkeypatch, capsys, args, message):
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:pw@127.0.0.1:1/0")
    with pytest.raises(SystemExit) as exited:
        beat_guard.main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_broker_url_exits_2_and_a_url_is_never_printed_with_its_password(monkeypatch, capsys):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    with pytest.raises(SystemExit) as exited:
        beat_guard.main(["--", "celery", "beat"])
    assert exited.value.code == 2
    assert "CELERY_BROKER_URL is not set" in capsys.readouterr().err
    assert beat_guard.mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert beat_guard.mask_url("redis://u:s3cret@h/0") == "redis://u:***@h/0"


class RecordingScheduler(beat.Scheduler):
    """An inner scheduler that records what it would send instead of sending it."""

    producer = None  # never connects: nothing is sent

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        self.sent.append(entry.name)
        return entry.name


def test_lease_scheduler_sends_only_before_the_deadline(tmp_path, monkeypatch, caplog):
    lease = tmp_path / "lease"
    monkeypatch.setenv(beat_fence.INNER_SCHEDULER_ENV, f"{__name__}:RecordingScheduler")
    monkeypatch.setenv(beat_fence.LEASE_FILE_ENV, str(lease))
    fenced = symbol_by_name(beat_fence.SCHEDULER_PATH)  # what `celery beat --scheduler` does
    assert issubclass(fenced, RecordingScheduler)

    app = Celery("fence-test", set_as_current=False)
    scheduler = fenced(app=app, lazy=True)
    entry = beat.ScheduleEntry(name="every-second", task="demo.tick", schedule=timedelta(seconds=1), app=app)

    beat_fence.write_stamp(lease, time.monotonic() + 5)
    assert scheduler.apply_async(entry) == "every-second"
    assert scheduler.sent == ["every-second"]

    for refused in ("past", "zero", "missing", "garbage"):
        if refused == "past":
            beat_fence.write_stamp(lease, time.monotonic() - 0.001)
        elif refused == "zero":
            beat_fence.write_stamp(lease, 0.0)
        elif refused == "missing":
            lease.unlink()
        else:
            lease.write_text("not a number")
        with caplog.at_level("ERROR", logger="celery_fleet.beat_guard"):
            assert scheduler.apply_async(entry) is None, refused
            scheduler.apply_entry(entry)  # beat's own path to apply_async
    assert scheduler.sent == ["every-second"]
    assert "not sending every-second" in caplog.text


def test_lease_scheduler_wraps_the_persistent_scheduler_by_default(monkeypatch):
    monkeypatch.setenv(beat_fence.INNER_SCHEDULER_ENV, "")
    assert issubclass(beat_fence.lease_scheduler_class(""), beat.PersistentScheduler)
    assert issubclass(symbol_by_name(beat_fence.SCHEDULER_PATH), beat.PersistentScheduler)


def test_a_hanging_renewal_is_cut_off_at_the_deadline(tmp_path):
    """The alarm interrupts a Redis call still running at the deadline instead of waiting it out."""

    class HangingLock:
        def extend(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(30)

    class HangingClient:
        def lock(self, *args: Any, **kwargs: Any) -> HangingLock:
            return HangingLock()

    lease = beat_lease.Lease(HangingClient(), KEY, TTL, RENEW, margin=1.0)  # type: ignore[arg-type]
    previous = signal.getsignal(signal.SIGALRM)
    lease.install_alarm()
    try:
        lease.deadline = time.monotonic() + 0.3
        started = time.monotonic()
        with pytest.raises(beat_lease.LeaseLost, match="deadline passed while waiting for Redis"):
            lease.renew_if_due()
        assert time.monotonic() - started < 5  # not the 30 s the call would have taken
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# The holder token, the run_id re-check, a stuck beat ---------------------------------------------------


def test_each_acquisition_gets_a_unique_token():
    tokens = {beat_lease.new_token() for _ in range(100)}
    assert len(tokens) == 100  # same host, pid and second: the random id still tells them apart
    assert all(re.fullmatch(r"host=\S+ pid=\d+ since=\S+ id=[0-9a-f]{32}", t) for t in tokens)


class SwappableServer(redis.Redis):
    """A client whose server reports a new run_id once ``swapped`` is set: a Redis restart."""

    swapped = False

    def info(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        answer = super().info(*args, **kwargs)
        return {**answer, "run_id": "0" * 40} if self.swapped else answer


def test_a_lease_won_from_a_server_that_changed_meanwhile_is_given_back(redis_server):
    client = SwappableServer.from_url(redis_server.url, socket_timeout=5)
    lease = beat_lease.Lease(client, KEY, ttl=TTL, renew_interval=RENEW, margin=1.0)
    assert wait_until(lease.may_try, TTL + 2)  # a server up for less than a TTL is waited out first
    client.swapped = True  # the server changes between the check and the acquire
    assert lease.acquire() is False
    assert redis_server.client().exists(KEY) == 0  # handed back at once
    assert lease.token == "" and lease.deadline == 0.0
    assert lease.may_try() is False  # and the new server is waited out like any restart


STUCK_CHILD = """\
import os, signal, sys, time
from celery_fleet.beat_fence import heartbeat

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with open(sys.argv[1], "a", encoding="utf-8") as f:
    f.write(f"start {os.getpid()} {time.monotonic()!r}\\n")
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # ticks for a while, longer than the stuck timeout
    heartbeat()
    time.sleep(0.2)
while True:  # then hangs: alive, but never ticks again
    time.sleep(1)
"""


def test_a_beat_that_stops_ticking_is_restarted_then_the_lease_given_up(redis_server, fleet):
    script = fleet.dir / "stuck_beat.py"
    script.write_text(STUCK_CHILD)
    stuck = 2.0
    client = redis_server.client()
    guard = fleet.start(
        "a",
        redis_server.url,
        f"--stuck-timeout={stuck}",
        command=[sys.executable, str(script), str(fleet.out), "3"],
    )
    first = wait_for_leader(client, guard)
    # Ticking for 3 s, longer than the stuck timeout, is not stuck.
    assert holds_for(lambda: guard.children() == [first], 2.5)
    starts = lambda: [pid for kind, pid, _ in fleet.events() if kind == "start"]  # noqa: E731
    # Then each beat hangs: restarted three times, then the supervisor exits and hands the lease over.
    bound = beat_guard.MAX_STUCK_RESTARTS * (3 + stuck + 2) + 10
    assert guard.proc.wait(timeout=bound) == 1, guard.stderr()
    assert len(set(starts())) == beat_guard.MAX_STUCK_RESTARTS + 1
    assert client.exists(KEY) == 0
    assert not any(alive(pid) for pid in starts())
    for n in range(1, beat_guard.MAX_STUCK_RESTARTS + 1):
        assert f"restarting it ({n} of {beat_guard.MAX_STUCK_RESTARTS})" in guard.stderr()
    assert "stuck again after 3 restarts: releasing the lease and exiting" in guard.stderr()


@pytest.mark.parametrize("stuck", ["0", "1.9", "nan", "inf"])
def test_a_stuck_timeout_too_short_to_start_beat_is_refused(monkeypatch, capsys, stuck):
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:pw@127.0.0.1:1/0")
    with pytest.raises(SystemExit) as exited:
        beat_guard.main([f"--stuck-timeout={stuck}", "--", "celery", "beat"])
    assert exited.value.code == 2
    assert "--stuck-timeout must be at least 2 seconds" in capsys.readouterr().err


def test_beat_sleeps_at_most_a_quarter_of_the_stuck_timeout_and_ticks_into_the_heartbeat(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(beat_fence.INNER_SCHEDULER_ENV, f"{__name__}:RecordingScheduler")
    monkeypatch.setenv(beat_fence.MAX_INTERVAL_ENV, "15")
    monkeypatch.setenv(beat_fence.HEARTBEAT_FILE_ENV, str(tmp_path / "heartbeat"))
    app = Celery("fence-test", set_as_current=False)
    scheduler = symbol_by_name(beat_fence.SCHEDULER_PATH)(app=app, lazy=True)
    assert scheduler.max_interval == 15  # Celery's own default is 300 s
    before = time.monotonic()
    assert scheduler.tick() <= 15
    assert before <= beat_fence.read_stamp(tmp_path / "heartbeat") <= time.monotonic()


# The broker fence: a message is enqueued only while the lease holds this holder's token ----------------

QUEUE = "fenced-test"


def fenced_connection(url: str, monkeypatch, token: str) -> Any:
    from kombu import Connection  # noqa: PLC0415

    monkeypatch.setenv(beat_fence.LEASE_KEY_ENV, KEY)
    monkeypatch.setenv(beat_fence.LEASE_TOKEN_ENV, token)
    return Connection(url, transport=beat_fence.transport_class())


def publish(connection: Any, body: str = "tick") -> None:
    from kombu import Exchange, Queue  # noqa: PLC0415

    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    with connection.Producer() as producer:
        producer.publish(
            {"body": body}, exchange=queue.exchange, routing_key=QUEUE, declare=[queue], retry=False
        )


def test_the_fenced_transport_enqueues_only_under_this_holders_token(redis_server, monkeypatch):
    client = redis_server.client()
    client.set(KEY, "mine", px=60_000)
    with fenced_connection(redis_server.url, monkeypatch, "mine") as connection:
        publish(connection)
        assert client.llen(QUEUE) == 1
        client.set(KEY, "a standby's", px=60_000)  # the lease changed hands
        with pytest.raises(beat_fence.LeaseFenced, match="not held by this holder"):
            publish(connection)
        client.delete(KEY)  # or expired
        with pytest.raises(beat_fence.LeaseFenced):
            publish(connection)
    assert client.llen(QUEUE) == 1


def test_without_the_lease_in_its_environment_nothing_is_sent(redis_server, monkeypatch):
    client = redis_server.client()
    client.set(KEY, "mine", px=60_000)
    with (
        fenced_connection(redis_server.url, monkeypatch, "") as connection,
        pytest.raises(beat_fence.LeaseFenced, match="holds no lease"),
    ):
        publish(connection)
    assert client.llen(QUEUE) == 0


def send_while_redis_is_paused(redis_server, connection: Any, standby_token: str) -> list[BaseException]:
    """Window 2: beat's send is in flight when Redis pauses; the lease expires meanwhile, a standby's
    acquire is queued behind the send; Redis resumes. Returns what the send raised."""
    client = redis_server.client()
    client.set(KEY, "mine", px=int(TTL * 1000))
    raised: list[BaseException] = []

    def send() -> None:
        try:
            publish(connection)
        except BaseException as exc:  # reported to the test
            raised.append(exc)

    connection.connect()
    with connection.channel():
        pass  # connected and declared before the pause
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.3)  # the send is on the wire first
        standby = threading.Thread(
            target=lambda: redis_server.client().set(KEY, standby_token, nx=True, px=60_000)
        )
        standby.start()
        time.sleep(TTL + 0.5)  # the lease expires while Redis is paused
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    sender.join(timeout=30)
    standby.join(timeout=30)
    assert not sender.is_alive() and not standby.is_alive()
    assert client.get(KEY) == standby_token.encode()  # the standby leads now
    return raised


def test_a_send_in_flight_while_the_lease_expires_is_not_enqueued(redis_server, monkeypatch):
    with fenced_connection(redis_server.url, monkeypatch, "mine") as connection:
        raised = send_while_redis_is_paused(redis_server, connection, "standby")
    assert [type(e) for e in raised] == [beat_fence.LeaseFenced]
    assert redis_server.client().llen(QUEUE) == 0


def test_without_the_fence_the_same_send_is_enqueued_under_the_new_leader(redis_server):
    from kombu import Connection  # noqa: PLC0415

    # The window is real: kombu's own transport delivers the stale message after the takeover.
    with Connection(redis_server.url) as connection:
        assert send_while_redis_is_paused(redis_server, connection, "standby") == []
    assert redis_server.client().llen(QUEUE) == 1


def test_a_beat_frozen_between_its_deadline_check_and_its_send_enqueues_nothing(
    redis_server, tmp_path, monkeypatch
):
    # Window 1: the deadline in the lease file still looks valid to beat (it was frozen, and has not
    # seen it closed), but the lease moved to a standby. The real scheduler's own path sends nothing.
    lease_file = tmp_path / "lease"
    beat_fence.write_stamp(lease_file, time.monotonic() + 60)
    monkeypatch.setenv(beat_fence.INNER_SCHEDULER_ENV, "celery.beat:Scheduler")
    monkeypatch.setenv(beat_fence.LEASE_FILE_ENV, str(lease_file))
    monkeypatch.setenv(beat_fence.LEASE_KEY_ENV, KEY)
    monkeypatch.setenv(beat_fence.LEASE_TOKEN_ENV, "mine")
    client = redis_server.client()
    client.set(KEY, "mine", px=60_000)
    app = Celery("fence-test", broker=redis_server.url, set_as_current=False)
    app.conf.task_default_queue = QUEUE
    scheduler = symbol_by_name(beat_fence.SCHEDULER_PATH)(app=app, lazy=True)
    entry = beat.ScheduleEntry(name="every-second", task="demo.tick", schedule=timedelta(seconds=1), app=app)
    try:
        scheduler.apply_async(entry)  # no producer given: the fenced one is used all the same
        assert client.llen(QUEUE) == 1  # while the lease is ours, beat's own path enqueues
        client.set(KEY, "standby", px=60_000)
        with pytest.raises(beat.SchedulingError, match="not held by this holder"):
            scheduler.apply_async(entry)
        scheduler.apply_entry(entry)  # beat's own loop: logs the error and goes on
        assert client.llen(QUEUE) == 1
    finally:
        scheduler.connection.release()
