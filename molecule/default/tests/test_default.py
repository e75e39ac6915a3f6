"""Behaviour of the whole stack on one host."""

from __future__ import annotations

import time

import pytest
from fleet_testing import (
    PATHS,
    STATUS,
    VENV,
    exposure,
    fleet_json,
    fleet_secrets,
    http_status,
    instance_of,
    journal,
    redis_cli,
    redis_info,
    worker_unit,
)

SECRET_FILES = {
    PATHS["broker_env"]: ("root", "root"),
    PATHS["worker_broker_env"]: ("root", "root"),
    PATHS["beat_broker_env"]: ("root", "root"),
    PATHS["flower_broker_env"]: ("root", "root"),
    PATHS["flower_env"]: ("root", "root"),
    "/etc/redis/redis.conf": ("root", "redis"),
}


def test_redis_is_active(host):
    assert host.service("redis-server").is_running
    assert host.service("redis-server").is_enabled


def test_redis_refuses_unauthenticated_clients(host, hostvars):
    assert "AuthenticationError" in redis_cli(host, hostvars, "ping", auth=False).stdout
    assert redis_cli(host, hostvars, "ping").stdout.strip() == "True"


def test_redis_keeps_queued_tasks(host, hostvars):
    info = redis_info(host, hostvars)
    assert info["maxmemory_policy"] == "noeviction"
    assert info["aof_enabled"] == 1
    # No user may read CONFIG, so the fsync rule is read where Redis reads it.
    assert "\nappendfsync everysec\n" in host.file("/etc/redis/redis.conf").content_string


def test_redis_listens_on_loopback_only(host):
    # A one-host fleet has no remote clients, so no private address is bound.
    listening = host.run("ss -Hltn 'sport = :6379'").stdout.split("\n")
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening if line.strip()}
    assert addresses and addresses <= {"127.0.0.1", "[::1]"}, addresses


def test_each_worker_is_active_and_consumes_exactly_its_queues(host, hostvars):
    expected = {w["name"]: sorted(w["queues"]) for w in hostvars["celery_workers"]}
    status = fleet_json(host, STATUS)
    workers = {instance_of(u["node"]): u for u in status["units"] if u["node"] and u["active"] == "active"}
    assert set(workers) == set(expected), "the units on the host differ from the inventory"
    for name, unit in workers.items():
        assert unit["active"] == "active", journal(host, unit["unit"])
        assert unit["queues"] == expected[name], f"{name} consumes {unit['queues']}"


def test_a_task_round_trips_through_every_queue_on_its_worker(host, hostvars):
    consumers = {q: w["name"] for w in hostvars["celery_workers"] for q in w["queues"]}
    results = fleet_json(host, f"{VENV}/bin/python -m demo_app.demo --timeout 60")
    assert set(results) == set(consumers)
    for queue, [result] in results.items():
        assert "error" not in result, f"{queue}: {result}"
        assert result["queue"] == queue
        assert instance_of(result["worker"]) == consumers[queue]
        assert result["worker"].endswith(f"@{result['hostname']}")


def test_beat_dispatches_the_periodic_task(host, hostvars):
    assert host.service("celery-beat").is_running, journal(host, "celery-beat")
    before = int(redis_cli(host, hostvars, "llen", "demo:ticks").stdout)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if int(redis_cli(host, hostvars, "llen", "demo:ticks").stdout) > before:
            return
        time.sleep(1)
    pytest.fail(f"no periodic tick ran in 30 s\n{journal(host, 'celery-beat')}")


def test_flower_requires_auth(host, hostvars):
    url = f"http://127.0.0.1:{hostvars.get('flower_port', 5555)}/api/workers"
    assert http_status(host, url) == 401
    assert http_status(host, url, hostvars["flower_user"], "wrong-password-123") == 401
    assert http_status(host, url, hostvars["flower_user"], hostvars["flower_password"]) == 200


def test_flower_listens_on_loopback_only(host):
    listening = host.run("ss -Hltn 'sport = :5555'").stdout.split("\n")
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening if line.strip()}
    assert addresses == {"127.0.0.1"}, addresses


def test_no_secret_on_any_command_line(host, hostvars):
    secrets = fleet_secrets(hostvars)
    cmdlines = host.run("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    assert "celery" in cmdlines  # the fleet's processes were read
    for secret in secrets:
        assert secret not in cmdlines


@pytest.mark.parametrize("path", sorted(SECRET_FILES))
def test_secret_files_are_root_only(host, path):
    f = host.file(path)
    assert f.exists
    assert (f.user, f.group) == SECRET_FILES[path]
    assert f.mode in (0o600, 0o640), oct(f.mode)


def test_every_fleet_unit_starts_at_boot_with_the_fleet_target(host, hostvars):
    assert host.service("celery.target").is_enabled
    wanted = host.run("systemctl show -p Wants --value celery.target").stdout.split()
    units = [worker_unit(host, w["name"]) for w in hostvars["celery_workers"]]
    for unit in [*units, "celery-beat.service", "flower.service"]:
        assert unit in wanted, f"{unit} would not start at boot"


def test_every_unit_the_project_writes_verifies_clean(host, hostvars):
    units = [worker_unit(host, w["name"]) for w in hostvars["celery_workers"]]
    units += ["celery-beat.service", "flower.service", "celery.target", "redis-server.service"]
    result = host.run(f"cd /tmp && systemd-analyze verify --man=no {' '.join(units)}")
    assert result.rc == 0
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize("unit", ["celery-beat.service", "flower.service"])
def test_service_exposure_is_under_its_bar(host, unit):
    assert exposure(host, unit) <= 1.0


def test_cpu_worker_exposure_is_under_its_bar(host, hostvars):
    for worker in hostvars["celery_workers"]:
        unit = worker_unit(host, worker["name"])
        assert exposure(host, unit) <= 2.0, unit


def test_a_beat_restarted_in_a_fast_loop_is_never_left_dead(host, hostvars):
    # Six starts within systemd's default 10 s window would hit its start limit and leave the unit
    # failed for good; the beat unit has none (StartLimitIntervalSec=0).
    for _ in range(6):
        assert host.run("systemctl restart celery-beat").rc == 0, journal(host, "celery-beat")
    state = host.run("systemctl show celery-beat -p ActiveState -p Result").stdout
    assert "ActiveState=active" in state and "Result=success" in state, state
    test_beat_dispatches_the_periodic_task(host, hostvars)  # and it still leads and ticks
