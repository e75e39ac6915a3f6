"""The demo app against a real redis-server and real workers: routing and reliability settings."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, demo_env, run_demo, start_demo_worker


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
        dispatched, _, node, ran = line.decode().split()
        assert node == "low@test"
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
