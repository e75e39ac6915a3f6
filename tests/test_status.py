"""The status probe's parsing and joining logic."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import demo_env, start_demo_worker

from celery_fleet import beat_scan, status
from celery_fleet.envfile import read_env_file


def test_env_files_parse_like_systemd_reads_them():
    text = '# comment\n\nCELERY_APP=demo_app\nCELERY_WORKER_ARGS="--queues=a,b --pool=solo"\n; other\n'
    assert read_env_file(text) == {
        "CELERY_APP": "demo_app",
        "CELERY_WORKER_ARGS": "--queues=a,b --pool=solo",
    }


def test_worker_units_map_to_their_node_names():
    assert status.node_name("celery-worker@gpu-0.service", "host1") == "gpu-0@host1"
    assert status.node_name("celery-beat.service", "host1") is None


def test_units_are_joined_with_the_workers_answers():
    units = [
        {"unit": "celery-worker@a.service", "active": "active", "sub": "running"},
        {"unit": "celery-worker@b.service", "active": "failed", "sub": "failed"},
        {"unit": "flower.service", "active": "active", "sub": "running"},
    ]
    queues = {"a@h": [{"name": "y"}, {"name": "x"}]}
    stats = {"a@h": {"total": {"t1": 3, "t2": 4}}}
    rows = status.summarize(units, "h", queues, stats)
    assert rows[0]["queues"] == ["x", "y"]
    assert rows[0]["tasks_done"] == 7
    assert rows[0]["answered"] is True
    assert rows[1]["answered"] is False
    assert rows[1]["queues"] is None
    assert rows[2]["node"] is None


def test_the_beat_unit_says_whether_it_leads():
    units = [{"unit": "celery-beat.service", "active": "active", "sub": "running"}]
    assert status.summarize(units, "h", {}, {}, beat_leads=True)[0]["beat"] == "leader"
    assert status.summarize(units, "h", {}, {}, beat_leads=False)[0]["beat"] == "standby"


def test_a_probe_that_cannot_run_says_why_in_one_line(tmp_path, capsys):
    missing = tmp_path / "broker.env"
    assert status.main(["--env-file", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("celery-fleet-status: FileNotFoundError:") and str(missing) in line


def test_fleet_lists_every_worker_the_broker_reaches_with_its_queues(redis_server, tmp_path):
    """Two real workers on a real redis-server, one of them started by hand without -Q: both are found."""
    env_file = tmp_path / "broker.env"
    env_file.write_text(f"CELERY_BROKER_URL={redis_server.url}\n")
    env = demo_env(redis_server)
    probe = [
        sys.executable,
        "-m",
        "celery_fleet.status",
        "--env-file",
        str(env_file),
        "--fleet",
        "--timeout",
        "2",
    ]
    workers = [
        start_demo_worker(env, "high@h1", "high_priority,datasets"),
        start_demo_worker(env, "celery@h2", "celery"),
    ]
    try:
        nodes: dict = {}
        deadline = time.monotonic() + 60
        while len(nodes) < 2 and time.monotonic() < deadline:
            out = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30, check=True)
            nodes = json.loads(out.stdout)["nodes"]
        assert nodes == {"celery@h2": ["celery"], "high@h1": ["datasets", "high_priority"]}
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=20)


def _fake_worker(tmp_path, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process whose command line is `<python> <dir>/celery worker <args>`, as /proc shows a real one."""
    script = tmp_path / "celery"
    script.write_text("import time\ntime.sleep(60)\n")
    return subprocess.Popen(
        [sys.executable, str(script), "--app", "demo_app", "worker", *args],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def _scan(proc: subprocess.Popen) -> list[dict]:
    """What the beat scan reports of ``proc`` once it runs; the process is killed after."""
    try:
        time.sleep(0.3)
        return [b for b in beat_scan.embedded_beats() if b["pid"] == proc.pid]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("args", "env", "via"),
    [
        (["-B"], {}, "its command line"),
        (["--beat"], {}, "its command line"),
        (["-EB", "--queues=a"], {}, "its command line"),
        (["-Bl", "info"], {}, "its command line"),
        (["--queues=a,b", "--pool=solo"], {}, None),
        (["--queues=a"], {"CELERY_WORKER_BEAT": "false"}, None),
        # Whether click reads CELERY_WORKER_BEAT=1 as "on" depends on its version: ask it.
        (["--queues=a"], {"CELERY_WORKER_BEAT": "1"}, "ask click"),
    ],
)
def test_the_scan_finds_every_worker_that_embeds_a_beat(tmp_path, args, env, via):
    found = _scan(_fake_worker(tmp_path, args, env))
    if via == "ask click":
        via = beat_scan.beat_source(args, env)
        assert via in (None, "its environment (CELERY_WORKER_BEAT)")
    assert [b["via"] for b in found] == ([via] if via else [])


@pytest.mark.parametrize(
    ("args", "via"),
    [("--app demo_app worker -B", "its command line"), ("-A demo_app worker --queues=a", None)],
)
def test_the_scan_reads_a_worker_whose_title_setproctitle_rewrote(args, via):
    # A worker's main process under setproctitle: its whole command line is Celery's title.
    title = f"[celeryd: w1@host:MainProcess] -active- ({args})"
    found = _scan(subprocess.Popen([title, "60"], executable="/bin/sleep"))
    assert [b["via"] for b in found] == ([via] if via else [])


def test_a_pool_childs_title_is_not_a_worker_of_its_own():
    assert beat_scan.from_title(["[celeryd: w1@host:ForkPoolWorker-1]"]) == [
        "[celeryd: w1@host:ForkPoolWorker-1]"
    ]
    assert beat_scan.worker_args(beat_scan.from_title(["[celeryd: w1@host:ForkPoolWorker-1]"])) is None
