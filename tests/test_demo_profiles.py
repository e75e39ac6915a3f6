"""The demo app's seed profiles: each routes to exactly its queues, and round-trips through real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, demo_env, run_demo, start_demo_worker
from demo_app.profiles import PROFILES

# Run in a fresh interpreter: DEMO_PROFILE is read when the app is imported.
REPORT = """
import json
from demo_app.celery import app
from demo_app.tasks import QUEUE_PROBES

app.loader.import_default_modules()
app.finalize(auto=True)

def queue(name):
    return app.amqp.router.route({}, name)["queue"].name

conf = app.conf
print(json.dumps({
    "declared": [q.name for q in conf.task_queues],
    "default": conf.task_default_queue,
    "routes": {name: queue(name) for name in app.tasks if not name.startswith("celery.")},
    "probes": {q: sig["task"] for q, (sig, _) in QUEUE_PROBES.items()},
    "beat": [entry["task"] for entry in conf.beat_schedule.values()],
    "visibility_timeout": conf.broker_transport_options["visibility_timeout"],
    "time_limit": conf.task_time_limit,
    "soft_time_limit": conf.task_soft_time_limit,
    "max_tasks_per_child": conf.worker_max_tasks_per_child,
    "prefetch": conf.worker_prefetch_multiplier,
    "result_expires": conf.result_expires,
    "acks_late": conf.task_acks_late,
    "reject_on_worker_lost": conf.task_reject_on_worker_lost,
}))
"""


def report(profile: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DEMO_PROFILE"}
    env["PYTHONPATH"] = str(ROOT / "examples" / "demo_app" / "src")
    if profile is not None:
        env["DEMO_PROFILE"] = profile
    out = subprocess.run(
        [sys.executable, "-c", REPORT], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_declared_queue_is_routed_to_and_nothing_else(name):
    profile = PROFILES[name]
    got = report(name)
    assert got["declared"] == list(profile.queues)
    assert set(got["routes"].values()) == set(profile.queues)
    for task, queue in profile.routes.items():
        assert got["routes"][task] == queue, task
    # One probe per queue, and each probe's task is routed to the queue it probes.
    assert set(got["probes"]) == set(profile.queues)
    assert all(got["routes"][task] == queue for queue, task in got["probes"].items())
    # Beat's tick runs in every profile.
    assert got["beat"] == ["demo_app.tasks.tick"]
    assert got["routes"]["demo_app.tasks.tick"] in profile.queues
    assert got["acks_late"] and got["reject_on_worker_lost"] and got["prefetch"] == 1
    # Redis must not redeliver a task that is still within its time limit.
    assert got["visibility_timeout"] > (got["time_limit"] or 0)


def test_lab_is_the_default_profile():
    assert report(None) == report("lab")


def test_semantik_carries_the_seed_settings():
    got = report("semantik")
    assert got["declared"] == ["celery"] and got["default"] == "celery"
    assert (got["soft_time_limit"], got["time_limit"]) == (3600, 7200)
    assert got["max_tasks_per_child"] == 100
    assert got["result_expires"] == 3600
    assert got["visibility_timeout"] > got["time_limit"]


def test_an_unknown_profile_is_refused_by_name():
    env = {**os.environ, "DEMO_PROFILE": "nope"}
    env["PYTHONPATH"] = str(ROOT / "examples" / "demo_app" / "src")
    out = subprocess.run(
        [sys.executable, "-c", "import demo_app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "DEMO_PROFILE='nope' is not a demo profile" in out.stderr
    assert "priority-tiers" in out.stderr


def test_priority_tiers_round_trips_through_workers_of_its_queues(redis_server):
    env = demo_env(redis_server, DEMO_PROFILE="priority-tiers")
    split = {"hi": "high_priority", "bg": "medium_priority,low_priority"}
    workers = [start_demo_worker(env, f"{name}@test", queues) for name, queues in split.items()]
    try:
        out = run_demo(env)
        assert out.returncode == 0, out.stdout + out.stderr
        results = json.loads(out.stdout)
        probes = PROFILES["priority-tiers"].probes
        assert set(results) == set(probes)
        for name, queues in split.items():
            for queue in queues.split(","):
                [result] = results[queue]
                assert (result["worker"], result["queue"]) == (f"{name}@test", queue)
                assert result["task"] == probes[queue][0]
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=5)
