"""The demo app against a real redis-server and real workers: routing and reliability settings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery
from conftest import ROOT, demo_env, run_demo, start_demo_worker

COMPONENT_APPS = ("demo_app.apps.gpu", "demo_app.apps.cpu", "demo_app.apps.io", "demo_app.apps.beat")


@pytest.fixture
def worker_env(redis_server):
    return demo_env(redis_server)


def start_worker(env, name: str, queues: str) -> subprocess.Popen:
    return start_demo_worker(env, f"{name}@test", queues)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def test_every_queue_round_trips_to_the_worker_that_consumes_it(worker_env):
    split = {"fast": "high_priority,datasets,processing", "slow": "training,extraction,low_priority"}
    workers = [start_worker(worker_env, name, queues) for name, queues in split.items()]
    try:
        out = run_demo(worker_env)
        assert out.returncode == 0, out.stdout + out.stderr
        import json  # noqa: PLC0415

        results = json.loads(out.stdout)
        for name, queues in split.items():
            for queue in queues.split(","):
                [result] = results[queue]
                assert result["worker"] == f"{name}@test"
                assert result["queue"] == queue
    finally:
        for w in workers:
            stop(w)


def test_a_task_nobody_consumes_stays_queued(worker_env, redis_server):
    """What celery-fleet exists to prevent: a routed queue with no worker keeps its tasks waiting."""
    worker = start_worker(worker_env, "fast", "high_priority")
    try:
        code = "from demo_app.tasks import train\nr = train.apply_async(args=(10,))\nprint(r.id)\n"
        subprocess.run(
            [sys.executable, "-c", code], env=worker_env, check=True, timeout=60, capture_output=True
        )
        time.sleep(2)
        assert redis_server.client().llen("training") == 1
    finally:
        stop(worker)


def test_reliability_settings():
    import sys as _sys  # noqa: PLC0415

    _sys.path.insert(0, str(ROOT / "examples" / "demo_app" / "src"))
    from demo_app.celery import QUEUES, app  # noqa: PLC0415

    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["visibility_timeout"] >= 3600
    routed = {route["queue"] for route in app.conf.task_routes.values()}
    assert routed == set(QUEUES)


def test_the_tick_schedule_is_aligned_to_the_clock():
    from datetime import UTC, datetime  # noqa: PLC0415

    from demo_app.schedules import every  # noqa: PLC0415

    s = every(5)
    last = datetime.fromtimestamp(1000.2, tz=UTC)

    def at(t: float) -> tuple[bool, float]:
        s.now = lambda: datetime.fromtimestamp(t, tz=UTC)
        due, remaining = s.is_due(last)
        return due, round(remaining, 6)

    assert at(1003.0) == (False, 2.0)  # same slot as the last run
    assert at(1005.1) == (True, 4.9)  # the next boundary, on time
    assert at(1006.0) == (False, 4.0)  # started mid-slot: wait, do not catch up
    assert at(1010.05) == (True, 4.95)


def test_a_tick_records_when_it_was_dispatched_not_when_it_ran(worker_env, redis_server):
    sent = time.time()
    subprocess.run(
        [sys.executable, "-c", "from demo_app.tasks import tick; tick.apply_async()"],
        env=worker_env,
        check=True,
        timeout=60,
        capture_output=True,
    )
    time.sleep(1.5)  # queued with no worker: it runs late
    worker = start_worker(worker_env, "low", "low_priority")
    try:
        client = redis_server.client()
        deadline = time.monotonic() + 30
        while not client.llen("demo:ticks") and time.monotonic() < deadline:
            time.sleep(0.1)
        [line] = client.lrange("demo:ticks", 0, -1)
        dispatched, _, node, ran, sender = line.decode().split()
        assert node == "low@test"
        assert sender == "demo_app"  # published through the base app
        assert sent <= float(dispatched) < sent + 1.0
        assert float(ran) - float(dispatched) >= 1.5
    finally:
        stop(worker)


def test_hog_makes_its_memory_resident():
    """hog(mb) really holds mb MiB: its process's peak resident size rises that far above where it was."""
    code = (
        "import resource, json, re\n"
        "from demo_app.tasks import hog\n"
        "status = open('/proc/self/status').read()\n"
        "before = int(re.search(r'VmRSS:\\s+(\\d+)', status).group(1))\n"
        "result = hog.run(96)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'grew_kib': after - before, **result}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT / "examples" / "demo_app" / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    import json  # noqa: PLC0415

    got = json.loads(out.stdout)
    assert got["allocated_mb"] == 96
    # An untouched allocation would not be resident at all; allow for pages the heap already held.
    assert got["grew_kib"] >= 0.9 * 96 * 1024


def test_gpu_probe_reports_pinning_threads_affinity_and_device_errors(monkeypatch, tmp_path):
    import os  # noqa: PLC0415

    from demo_app.tasks import gpu_probe  # noqa: PLC0415

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    missing = tmp_path / "nvidia9"
    got = gpu_probe.run([os.devnull, str(missing), str(tmp_path)])
    assert got["devices"] == {os.devnull: "ok", str(missing): "ENOENT", str(tmp_path): "EISDIR"}
    assert (got["cuda_visible_devices"], got["cuda_device_order"]) == ("GPU-1234", "PCI_BUS_ID")
    assert got["threads"]["OMP_NUM_THREADS"] == "3"
    assert "MKL_NUM_THREADS" not in got["threads"]
    assert got["cpu_affinity"] == sorted(os.sched_getaffinity(0))
    assert got["pid"] == os.getpid()


def start_app_worker(env, app: str, node: str, queues: str, **popen: object) -> subprocess.Popen:
    """Like conftest's start_demo_worker, but for any app module: ``celery -A <app> worker``."""
    argv = [sys.executable, "-m", "celery", "--app", app, "worker", f"--hostname={node}"]
    argv += [
        f"--queues={queues}",
        "--pool=solo",
        "--without-mingle",
        "--without-gossip",
        "--loglevel=WARNING",
    ]
    return subprocess.Popen(argv, env=env, **popen)  # type: ignore[call-overload]


def client_of(env) -> Celery:
    """A bare client that sends by task name, as another service would; not made the current app."""
    app = Celery(
        "whoami-test",
        broker=env["CELERY_BROKER_URL"],
        backend=env["CELERY_RESULT_BACKEND"],
        set_as_current=False,
    )
    app.conf.update(redis_socket_timeout=10, broker_transport_options={"socket_timeout": 10})
    return app


def test_each_worker_answers_whoami_with_the_app_it_runs(worker_env):
    workers = [
        start_app_worker(worker_env, "demo_app.apps.gpu", "gpu@test", "training"),
        start_app_worker(worker_env, "demo_app", "base@test", "high_priority"),
    ]
    client = client_of(worker_env)
    try:
        gpu = client.send_task("demo_app.tasks.whoami", queue="training").get(timeout=60)
        base = client.send_task("demo_app.tasks.whoami", queue="high_priority").get(timeout=60)
        assert (gpu["app"], gpu["worker"], gpu["queue"]) == ("demo_app.apps.gpu", "gpu@test", "training")
        assert (base["app"], base["worker"], base["queue"]) == ("demo_app", "base@test", "high_priority")
        # The component app runs every task, not only whoami.
        trained = client.send_task("demo_app.tasks.train", args=(10,), queue="training").get(timeout=60)
        assert trained["worker"] == "gpu@test"
    finally:
        client.close()
        for w in workers:
            stop(w)


# Each app resolved as `celery -A <module>` does, in a fresh interpreter (each app made becomes current).
APPS_REPORT = """
import json, sys
from celery.app.utils import find_app
from demo_app.delivery import DeliveryCappedTask

out = {}
for name in sys.argv[1:]:
    app = find_app(name)
    app.loader.import_default_modules()
    tasks = {n: t for n, t in app.tasks.items() if not n.startswith("celery.")}
    out[name] = {
        "main": app.main,
        "tasks": sorted(tasks),
        "capped": all(isinstance(t, DeliveryCappedTask) and t.app is app for t in tasks.values()),
        "queues": [q.name for q in app.conf.task_queues],
        "default": app.conf.task_default_queue,
        "routes": {n: app.amqp.router.route({}, n)["queue"].name for n in sorted(tasks)},
        "beat": {k: [e["task"], e["schedule"].seconds] for k, e in app.conf.beat_schedule.items()},
        "broker": app.conf.broker_url,
        "acks_late": app.conf.task_acks_late,
    }
print(json.dumps(out))
"""


def test_every_component_app_is_the_base_app_under_its_own_name(worker_env):
    names = ("demo_app", *COMPONENT_APPS)
    out = subprocess.run(
        [sys.executable, "-c", APPS_REPORT, *names],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {name: got[name].pop("main") for name in names} == {name: name for name in names}
    base = got["demo_app"]
    assert "demo_app.tasks.whoami" in base["tasks"] and "demo_app.tasks.tick" in base["tasks"]
    assert base["capped"]
    # whoami routes like the other unrouted tasks: to the profile's default queue.
    assert base["routes"]["demo_app.tasks.whoami"] == base["default"] == "high_priority"
    for name in COMPONENT_APPS:
        assert got[name] == base, name


def test_beat_of_the_beat_app_stamps_its_ticks_with_its_name(worker_env, redis_server, tmp_path: Path):
    """Real `celery -A demo_app.apps.beat beat`: its ticks carry demo_sender_app, and the tick records it."""
    env = {**worker_env, "DEMO_TICK_SECONDS": "1"}
    log = tmp_path / "beat.log"
    worker = start_app_worker(env, "demo_app.apps.cpu", "cpu@test", "low_priority")
    beat_argv = [sys.executable, "-m", "celery", "--app", "demo_app.apps.beat", "beat"]
    beat_argv += [f"--schedule={tmp_path / 'beat-schedule'}", f"--pidfile={tmp_path / 'beat.pid'}"]
    beat = subprocess.Popen([*beat_argv, "--loglevel=INFO"], env=env, stderr=log.open("wb"))
    try:
        client = redis_server.client()
        deadline = time.monotonic() + 30
        while client.llen("demo:ticks") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line.decode() for line in client.lrange("demo:ticks", 0, -1)]
        assert len(lines) >= 2, log.read_text()
        for line in lines:
            dispatched, _, node, ran, sender = line.split()
            assert (node, sender) == ("cpu@test", "demo_app.apps.beat"), line
            assert float(ran) >= float(dispatched)
    finally:
        stop(beat)
        stop(worker)
