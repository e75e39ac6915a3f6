"""The rollout: its batches and canary, the memory overlap, release retention, and the canary itself."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from celery import Celery
from conftest import ROOT, demo_env, load_plugin, run_ansible_module, start_demo_worker

from celery_fleet import canary, status

plugin = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]
RELEASES = ROOT / "collections/ansible_collections/celery_fleet/fleet/plugins/modules/releases.py"
MIB = 1024**2


def action(instance: str, mode: str = "handoff") -> dict:
    return {"instance": instance, "unit": f"{instance}.b", "old": f"{instance}.a", "mode": mode}


def rollouts(hosts: dict[str, dict[str, list[str]]]) -> dict:
    """``{host: {instance: queues}}`` as the role hands it over: every instance rolls out."""
    return {
        host: {
            "actions": [action(name) for name in units],
            "instances": [{"instance": n, "queues": q, "app": "demo_app"} for n, q in units.items()],
        }
        for host, units in hosts.items()
    }


FLEET = rollouts(
    {
        "h1": {"cpu-1": ["cpu"], "cpu-2": ["cpu"], "io": ["io", "default"]},
        "h2": {"cpu-1": ["cpu"], "gpu": ["training"], "io": ["io"]},
    }
)


def units_of(batch: dict) -> list[tuple[str, str]]:
    return [(host, a["instance"]) for host, actions in batch.items() for a in actions]


def test_the_canary_is_one_unit_per_queue_and_the_rest_follow_in_batches():
    batches = plugin.celery_worker_batches(FLEET, 2)
    canary = units_of(batches[0])
    queues = {(h, i["instance"]): i["queues"] for h, r in FLEET.items() for i in r["instances"]}
    covered = [q for unit in canary for q in queues[unit]]
    assert sorted(set(covered)) == ["cpu", "default", "io", "training"]
    # One unit per queue: no queue is covered twice where one pick would do.
    assert len(canary) == 3, canary
    rest = [u for b in batches[1:] for u in units_of(b)]
    assert all(len(units_of(b)) <= 2 for b in batches[1:])
    everything = [(h, a["instance"]) for h, r in FLEET.items() for a in r["actions"]]
    assert sorted(canary + rest) == sorted(everything)
    # Each action carries what the canary needs.
    assert batches[0]["h1"][0]["queues"] and batches[0]["h1"][0]["app"] == "demo_app"


@pytest.mark.parametrize(("size", "after_canary"), [("100%", 1), ("50%", 2), ("1", 3), (1, 3), ("25%", 3)])
def test_batch_size_is_a_count_or_a_share_of_the_units_after_the_canary(size, after_canary):
    assert len(plugin.celery_worker_batches(FLEET, size)) == 1 + after_canary


@pytest.mark.parametrize("size", ["0", "0%", "101%", "-1", "1.5", "%", "", "two", True, "1 %", "1\n"])
def test_a_batch_size_out_of_the_grammar_is_refused(size):
    assert plugin.batch_size(size, 10) is None


def test_nothing_to_roll_out_makes_no_batch():
    assert plugin.celery_worker_batches({"h1": {"actions": [], "instances": []}}, "25%") == []


def host(memtotal_mb: int, overcommit: float = 1.0) -> dict:
    return {"cpus": 4, "app": "demo_app", "memtotal_mb": memtotal_mb, "memory_overcommit": overcommit}


def handoffs(entries: list[dict], h: dict) -> tuple[dict[str, str], list[str]]:
    result = plugin.celery_worker_plan(entries, DEFAULTS, h)
    assert result["errors"] == [], result["errors"]
    return {i["instance"]: i["handoff"] for i in result["instances"]}, result["warnings"]


def test_units_overlap_where_the_budget_has_room_for_old_and_new():
    entries = [{"name": "w", "queues": ["q"], "memory_max": "1G", "replicas": 2}]
    assert handoffs(entries, host(4096)) == ({"w-1": "overlap", "w-2": "overlap"}, [])


def test_a_unit_without_room_restarts_in_place_and_the_warning_names_its_queues_and_bound():
    entries = [
        {"name": "small", "queues": ["fast"], "memory_max": "512M"},
        {"name": "big", "queues": ["training", "eval"], "memory_max": "2G", "stop_timeout": 900},
    ]
    modes, warnings = handoffs(entries, host(3 * 1024))
    assert modes == {"small": "overlap", "big": "in_place"}
    [warning] = warnings
    assert "celery_workers[big]" in warning and "training, eval" in warning and "930 s" in warning
    assert "celery_worker_memory_overcommit" in warning
    # An overcommit the team chose makes the room.
    assert handoffs(entries, host(3 * 1024, overcommit=2.0))[0] == {"small": "overlap", "big": "overlap"}


def test_units_without_a_memory_limit_always_overlap():
    assert handoffs([{"name": "w", "queues": ["q"]}], host(64))[0] == {"w": "overlap"}


@pytest.mark.parametrize(
    ("cmdline", "release"),
    [
        (["/opt/cf/releases/3f2a/bin/python3", "/opt/cf/releases/3f2a/bin/celery", "worker"], "3f2a"),
        (["/srv/x/releases/abc/bin/celery-fleet-beat-guard", "--", "y"], "abc"),
        (["/opt/celery-fleet/venv/bin/celery", "worker"], None),
        (["releases/abc/bin/celery"], None),
        ([], None),
    ],
)
def test_a_process_release_is_the_release_directory_it_starts_from(cmdline, release):
    assert status.release_of(cmdline) == release


def test_main_pids_are_read_per_unit_in_any_property_order():
    out = "MainPID=8523\nId=flower.service\n\nId=celery-beat.service\nMainPID=0\n\nMainPID=7\nId=x.service\n"
    assert status.parse_pids(out) == {"flower.service": 8523, "x.service": 7}


def test_status_rows_carry_release_and_draining():
    units = [
        {"unit": "celery-worker@a.a.service", "active": "deactivating", "sub": "stop-sigterm"},
        {"unit": "celery-worker@a.b.service", "active": "active", "sub": "running"},
    ]
    rows = status.summarize(units, "h", {}, {}, releases={"celery-worker@a.b.service": "new"})
    assert [(r["release"], r["draining"]) for r in rows] == [(None, True), ("new", False)]


def make_release(releases: Path, name: str, installed: float | None) -> Path:
    path = releases / name
    (path / "bin").mkdir(parents=True)
    if installed is not None:
        marker = path / ".celery-fleet-installed"
        marker.write_text(name)
        os.utime(marker, (installed, installed))
    return path


def test_releases_beyond_the_newest_n_go_unless_a_process_runs_from_them(tmp_path):
    releases, wheelhouse = tmp_path / "releases", tmp_path / "wheelhouse"
    now = time.time()
    for i, name in enumerate(["r1", "r2", "r3", "r4", "r5"]):
        make_release(releases, name, now - 1000 + i)
        (wheelhouse / name).mkdir(parents=True)
    make_release(releases, "broken", None)  # an install that never finished
    # A process that runs from r1, as a worker draining on it does: its command line names it.
    # r2 served last (a rollback returned to it after r5 was installed), r3 before it; r1, r4 and
    # r5 never passed verify.
    for name, when in (("r3", now - 10), ("r2", now)):
        served = releases / name / ".celery-fleet-served"
        served.write_text("")
        os.utime(served, (when, when))
    sleeper = subprocess.Popen(["/bin/sh", "-c", "sleep 30", str(releases / "r1/bin/celery")])
    try:
        answer = run_ansible_module(
            RELEASES,
            {"releases_dir": str(releases), "wheelhouse_dir": str(wheelhouse), "current": "r4", "keep": 3},
            tmp_path,
            timeout=60,
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not answer.get("failed"), answer
    # Kept: r4 (current), the two that served last (r2, r3), and r1 (in use); r5, which never
    # served, and the incomplete one go.
    assert sorted(p.name for p in releases.iterdir()) == ["r1", "r2", "r3", "r4"]
    assert [(r["name"], bool(r["served"]), r["in_use"]) for r in answer["releases"]] == [
        ("r2", True, False),
        ("r3", True, False),
        ("r4", False, False),
        ("r1", False, True),
    ]
    assert sorted(p.name for p in wheelhouse.iterdir()) == ["r4"]
    again = run_ansible_module(
        RELEASES, {"releases_dir": str(releases), "current": "r4", "keep": 0}, tmp_path, timeout=60
    )
    assert not again["changed"] and len(again["releases"]) == 4
    # r4 passes verify: it is marked served once, and becomes the first a later rollback passes over.
    marked = run_ansible_module(RELEASES, {"releases_dir": str(releases), "served": "r4"}, tmp_path, 60)
    assert marked["changed"] and marked["releases"][0]["name"] == "r4"
    assert not run_ansible_module(RELEASES, {"releases_dir": str(releases), "served": "r4"}, tmp_path, 60)[
        "changed"
    ]


@contextmanager
def demo_worker(redis_server, node: str) -> Iterator[Celery]:
    """A real demo worker consuming cpu and io as ``node``, and a client app with the broker's environment."""
    env = demo_env(redis_server)
    worker = start_demo_worker(env, node, "cpu,io", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({k: v for k, v in env.items() if k.startswith("CELERY_")})
    app = Celery("rollout-test")
    try:
        canary.wait_consuming(app, node, {"cpu", "io"}, time.monotonic() + 60, lambda: None)
        yield app
    finally:
        app.close()
        worker.terminate()
        worker.wait(timeout=60)
        for k in env:
            if k.startswith("CELERY_"):
                os.environ.pop(k, None)


def test_the_canary_waits_for_the_queues_and_sends_a_task_through_the_new_worker(redis_server, tmp_path):
    node = f"w.b@{tmp_path.name}"
    with demo_worker(redis_server, node) as app:
        canary.round_trip(app, node, time.monotonic() + 30)
        # The private queue is gone again, and the worker consumes exactly what it did.
        replies = app.control.inspect(destination=[node], timeout=2).active_queues()
        assert sorted(q["name"] for q in replies[node]) == ["cpu", "io"]
        assert not redis_server.client().exists(f"celery-fleet.canary.{node}")
        with pytest.raises(canary.CanaryError, match="consumes"):
            canary.wait_consuming(app, node, {"cpu", "training"}, time.monotonic() + 2, lambda: None)
        # Retired, the worker takes no more tasks but still answers (its running tasks finish).
        canary.retire(app, node, {"cpu", "io"}, time.monotonic() + 30)
        replies = app.control.inspect(destination=[node], timeout=2).active_queues()
        assert replies[node] == []


def test_a_worker_too_busy_to_answer_passes_on_its_log_of_a_real_task(redis_server):
    node = "w.b@nowhere"
    log = (
        f"[..] {node} ready.\n[..] Task demo_app.tasks.train[0b6c1c8e-7a1e-4c55-9d5e-3f3c1d2a9e10] received\n"
    )
    os.environ["CELERY_BROKER_URL"] = redis_server.url
    app = Celery("canary-test")
    try:
        # Nobody answers for `nowhere`, as a solo worker inside a task cannot: its log says enough.
        assert (
            canary.wait_consuming(app, node, {"q"}, time.monotonic() + 60, lambda: None, log=lambda: log)
            is False
        )
        with pytest.raises(canary.CanaryError, match="did not answer"):
            canary.wait_consuming(
                app, node, {"q"}, time.monotonic() + 3, lambda: None, log=lambda: f"{node} ready."
            )
    finally:
        app.close()
        os.environ.pop("CELERY_BROKER_URL")


def test_the_canary_gives_up_at_once_on_a_unit_that_died(redis_server):
    asked = []

    def dead() -> None:
        asked.append(1)
        raise canary.CanaryError("celery-worker@w.b.service exited while starting (state failed)")

    os.environ["CELERY_BROKER_URL"] = redis_server.url
    app = Celery("canary-test")
    try:
        with pytest.raises(canary.CanaryError, match="exited while starting"):
            canary.wait_consuming(app, "w.b@nowhere", {"q"}, time.monotonic() + 600, dead)
        assert asked == [1]  # the first look, not the deadline, ended it
    finally:
        app.close()
        os.environ.pop("CELERY_BROKER_URL")


def test_a_paused_queue_is_consumed_by_no_worker_until_resumed(redis_server, tmp_path):
    from celery_fleet import pause  # noqa: PLC0415 -- beside its test

    node = f"w.a@{tmp_path.name}"
    with demo_worker(redis_server, node) as app:
        assert pause.pause(app, {"io"}, time.monotonic() + 30) == {"paused": ["io"]}
        assert pause.paused_queues() == ["io"]
        assert pause.consuming(app, {"cpu", "io"}) == {node: ["cpu"]}
        # Only units configured for the queue take it back: this one is, as instance w on its host.
        resumed = pause.resume(app, {"io"}, {"io": {f"w@{tmp_path.name}"}}, time.monotonic() + 30)
        assert resumed == {"resumed": ["io"], "consumers": [node]}
        assert pause.paused_queues() == []
        assert pause.consuming(app, {"cpu", "io"}) == {node: ["cpu", "io"]}
