"""The `semantik` example inventory, deployed as it is, does what its README promises."""

from __future__ import annotations

from fleet_testing import STATUS, VENV, fleet_json, http_status, journal, on_host, redis_cli, redis_info, show

# A fresh deploy starts every instance in its slot a.
WORKER = "celery-worker@embedding.a.service"


def test_the_one_embedding_worker_consumes_the_default_queue(host):
    status = fleet_json(host, STATUS)
    workers = {u["unit"]: u for u in status["units"] if u["node"]}
    assert set(workers) == {WORKER}
    assert workers[WORKER]["active"] == "active", journal(host, WORKER)
    assert workers[WORKER]["queues"] == ["celery"]


def test_the_seed_tasks_round_trip_through_the_default_queue(host):
    # The demo app's semantik build routes the seed's tasks to `celery`, as the
    # seed's worker without -Q expects.
    results = fleet_json(host, f"{VENV}/bin/python -m demo_app.demo --rounds 3 --timeout 60")
    assert list(results) == ["celery"]
    for result in results["celery"]:
        assert "error" not in result, result
        assert result["task"] == "semantik.test_task"
        assert result["worker"] == f"embedding.a@{result['hostname']}"


def test_the_worker_runs_the_seed_pool_settings(host):
    stats = on_host(host, "print(json.dumps(app.control.inspect(timeout=10).stats()))")
    [(node, worker)] = stats.items()
    assert node.startswith("embedding.a@")
    assert worker["pool"]["max-concurrency"] == 1
    assert worker["pool"]["max-tasks-per-child"] == 100
    # prefetch_multiplier 1 with one process: one task reserved at a time.
    assert worker["prefetch_count"] == 1


def test_the_worker_is_pinned_to_gpu_0_and_cannot_open_gpu_1(host):
    probe = on_host(
        host,
        """
r = app.send_task("demo_app.tasks.gpu_probe",
                  kwargs={"paths": ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]})
print(json.dumps(r.get(timeout=60)))
""",
    )
    assert probe["worker"].startswith("embedding.a@")
    assert probe["cuda_visible_devices"] == "0"
    assert probe["cuda_device_order"] == "PCI_BUS_ID"
    # ENXIO: the open reached the (absent) driver; EPERM: the device policy refused it.
    assert probe["devices"] == {
        "/dev/nvidia0": "ENXIO",
        "/dev/nvidia1": "EPERM",
        "/dev/nvidiactl": "ENXIO",
        "/dev/nvidia-uvm": "ENXIO",
    }, probe


def test_the_seed_limits_reach_systemd(host):
    unit = show(host, WORKER, "MemoryMax", "MemoryHigh", "MemorySwapMax", "TimeoutStopUSec", "MainPID")
    assert unit["MemoryMax"] == str(4 * 1024**3)
    assert unit["MemoryHigh"] == str(4 * 1024**3 * 9 // 10)
    assert unit["MemorySwapMax"] == "0"
    # The 2 h hard limit plus 30 s: a stop waits for the longest job to finish.
    assert unit["TimeoutStopUSec"] == "2h 30s"
    environ = host.run(f"tr '\\0' '\\n' < /proc/{unit['MainPID']}/environ").stdout.splitlines()
    assert "MODEL_MAX_MEMORY_GB=8" in environ


def test_the_visibility_timeout_outlasts_the_longest_job(host):
    # Redis redelivers an unacknowledged task after the visibility timeout; it
    # must outlast the longest a job may run, stop included, or jobs run twice.
    conf = on_host(host, "print(json.dumps(app.conf.broker_transport_options))")
    stop_seconds = 7200 + 30
    assert conf["visibility_timeout"] > stop_seconds


def test_redis_holds_the_seed_limit_without_evicting_tasks(host, hostvars):
    info = redis_info(host, hostvars)
    assert info["maxmemory"] == 512 * 1024**2
    assert info["maxmemory_policy"] == "noeviction"
    assert "AuthenticationError" in redis_cli(host, hostvars, "ping", auth=False).stdout


def test_flower_refuses_the_seed_default_login_and_takes_the_vault_one(host, hostvars):
    url = "http://127.0.0.1:5555/api/workers"
    assert http_status(host, url) == 401
    assert http_status(host, url, "admin", "admin") == 401
    assert hostvars["flower_user"] == "semantik-ops"
    assert http_status(host, url, hostvars["flower_user"], hostvars["flower_password"]) == 200


def test_the_single_beat_candidate_holds_the_lease(host, hostvars):
    assert host.service("celery-beat").is_running, journal(host, "celery-beat")
    holder = redis_cli(host, hostvars, "GET", "celery-fleet:beat-leader").stdout
    assert "host=semantik-1 " in holder, holder
