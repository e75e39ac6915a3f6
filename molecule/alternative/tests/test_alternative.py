"""Workers with GPUs, limits, autoscale and replicas: pinning, OOM, graceful restart, hardening."""

from __future__ import annotations

import pytest
from fleet_testing import STATUS, exposure, fleet_json, instance_of, journal, on_host, show, worker_unit

# What molecule.yml's worker list expands to.
UNITS = {
    "gpu-1": ["extraction", "training"],
    "gpu-2": ["extraction", "training"],
    "tiers-1": ["high_priority"],
    "tiers-2": ["high_priority"],
    "hungry": ["processing"],
    "io": ["datasets"],
    "low": ["low_priority"],
}
GPU_UNITS = {"gpu-1": 0, "gpu-2": 1}


def test_the_units_on_the_host_are_exactly_the_expanded_inventory(host):
    status = fleet_json(host, STATUS)
    workers = {instance_of(u["node"]): u for u in status["units"] if u["node"] and u["active"] == "active"}
    assert set(workers) == set(UNITS)
    for name, unit in workers.items():
        assert unit["active"] == "active", journal(host, unit["unit"])
        assert unit["queues"] == UNITS[name], f"{name} consumes {unit['queues']}"


def test_each_gpu_unit_reaches_its_own_gpu_and_no_other(host):
    # Both GPU units consume `training`; send probes until each has answered.
    seen = on_host(
        host,
        """
seen = {}
for _ in range(10):
    results = [app.send_task("demo_app.tasks.gpu_probe", queue="training",
                             kwargs={"paths": ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"]})
               for _ in range(4)]
    for r in results:
        out = r.get(timeout=60)
        seen[out["worker"].split("@")[0].split(".")[0]] = out
    if len(seen) == 2:
        break
print(json.dumps(seen))
""",
    )
    assert set(seen) == set(GPU_UNITS), f"answered: {sorted(seen)}"
    for unit, index in GPU_UNITS.items():
        probe = seen[unit]
        other = 1 - index
        assert probe["cuda_visible_devices"] == str(index)
        assert probe["cuda_device_order"] == "PCI_BUS_ID"
        # ENXIO: the open reached the (absent) driver; EPERM: the device policy refused it.
        assert probe["devices"][f"/dev/nvidia{index}"] == "ENXIO", probe
        assert probe["devices"]["/dev/nvidiactl"] == "ENXIO", probe
        assert probe["devices"][f"/dev/nvidia{other}"] == "EPERM", probe


def test_cpu_units_see_no_gpu_and_keep_to_their_cpus(host):
    probe = on_host(
        host,
        """
r = app.send_task("demo_app.tasks.gpu_probe", queue="high_priority",
                  kwargs={"paths": ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"]})
print(json.dumps(r.get(timeout=60)))
""",
    )
    assert probe["worker"].startswith("tiers-")
    assert probe["cuda_visible_devices"] == ""
    assert set(probe["devices"].values()) == {"ENOENT"}, probe
    # cpus: "0" -> pinned to CPU 0, and numeric libraries capped to one thread.
    assert probe["cpu_affinity"] == [0]
    assert probe["threads"]["OMP_NUM_THREADS"] == "1"


def test_limits_reach_systemd(host):
    hungry = show(host, worker_unit(host, "hungry"), "MemoryMax", "MemoryHigh", "MemorySwapMax", "OOMPolicy")
    assert hungry == {
        "MemoryMax": str(256 * 1024**2),
        "MemoryHigh": str(256 * 1024**2 * 9 // 10),
        "MemorySwapMax": "0",
        "OOMPolicy": "continue",
    }
    assert show(host, worker_unit(host, "gpu-1"), "OOMPolicy", "MemoryMax") == {
        "OOMPolicy": "stop",
        "MemoryMax": str(1024**3),
    }
    tiers = show(host, worker_unit(host, "tiers-1"), "CPUAffinity", "CPUQuotaPerSecUSec", "Nice")
    assert tiers == {"CPUAffinity": "0", "CPUQuotaPerSecUSec": "500ms", "Nice": "5"}
    # stop_timeout plus 30 s to shut down; SIGTERM to the main process only.
    low = show(host, worker_unit(host, "low"), "TimeoutStopUSec", "KillMode", "KillSignal")
    assert low == {"TimeoutStopUSec": "1min 30s", "KillMode": "mixed", "KillSignal": "15"}


def test_an_oom_killed_child_leaves_the_worker_running(host):
    unit = worker_unit(host, "hungry")
    before = show(host, unit, "MainPID", "NRestarts")
    outcome = on_host(
        host,
        """
r = app.send_task("demo_app.tasks.hog", args=[600], queue="processing")
try:
    r.get(timeout=120, propagate=False)
except Exception as e:
    print(json.dumps({"state": "TIMEOUT", "error": repr(e)}))
    raise SystemExit(0)
after = app.send_task("demo_app.tasks.ping", queue="processing").get(timeout=60)
print(json.dumps({"state": r.state, "result": repr(r.result), "next": after}))
""",
    )
    log = journal(host, unit)
    # The task that is killed every time ends FAILED after its capped deliveries, not requeued forever.
    assert outcome["state"] == "FAILURE", f"{outcome}\n{log}"
    assert "DeliveryLimitExceeded" in outcome["result"], outcome
    assert outcome["next"]["pong"] is True
    assert instance_of(outcome["next"]["worker"]) == "hungry"
    after = show(host, unit, "MainPID", "NRestarts", "ActiveState")
    assert after == {**before, "ActiveState": "active"}, f"the unit restarted\n{log}"
    assert "signal 9" in log or "SIGKILL" in log, log


def test_a_restart_under_load_loses_and_repeats_no_task(host):
    sent = on_host(
        host,
        """
import redis
r = redis.Redis.from_url(app.conf.broker_url, socket_timeout=10)
r.delete("demo:runs")
ids = [app.send_task("demo_app.tasks.sleep", args=[1.5], queue="low_priority").id for _ in range(16)]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    started = [i for i in ids if app.AsyncResult(i).state == "STARTED"]
    if started:
        break
    time.sleep(0.1)
print(json.dumps({"ids": ids, "started": started}))
""",
    )
    assert sent["started"], "no task started within 60 s"
    low = worker_unit(host, "low")
    restart = host.run(f"systemctl restart {low}")
    assert restart.rc == 0, restart.stderr
    ids = sent["ids"]
    done = on_host(
        host,
        f"""
import redis
ids = {ids!r}
states = {{}}
for i in ids:
    res = app.AsyncResult(i)
    res.get(timeout=120, propagate=False)
    states[i] = res.state
r = redis.Redis.from_url(app.conf.broker_url, socket_timeout=10)
runs = [x.decode() for x in r.lrange("demo:runs", 0, -1)]
print(json.dumps({{"states": states, "runs": runs}}))
""",
        timeout=200,
    )
    log = journal(host, low)
    assert set(done["states"].values()) == {"SUCCESS"}, f"{done['states']}\n{log}"
    # Each task ran exactly once: the ones running at the restart finished, the rest waited.
    assert sorted(done["runs"]) == sorted(ids), log


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_exposure_is_under_its_bar(host, unit):
    bar = 3.0 if unit in GPU_UNITS else 2.0
    assert exposure(host, worker_unit(host, unit)) <= bar


def test_every_worker_unit_verifies_clean(host):
    units = " ".join(worker_unit(host, u) for u in UNITS)
    result = host.run(f"cd /tmp && systemd-analyze verify --man=no {units}")
    assert result.rc == 0
    assert result.stdout + result.stderr == ""


# Per-component apps: the app module each unit runs, from molecule.yml (low runs the fleet's app).
APPS = {
    "gpu-1": "demo_app.apps.gpu",
    "gpu-2": "demo_app.apps.gpu",
    "tiers-1": "demo_app.apps.cpu",
    "tiers-2": "demo_app.apps.cpu",
    "hungry": "demo_app.apps.cpu",
    "io": "demo_app.apps.io",
    "low": "demo_app",
}


def main_argv(host, unit: str) -> list[str]:
    pid = show(host, unit, "MainPID")["MainPID"]
    return host.file(f"/proc/{pid}/cmdline").content_string.split("\0")


@pytest.mark.parametrize("unit", sorted(APPS))
def test_each_worker_runs_its_own_app(host, unit):
    argv = main_argv(host, worker_unit(host, unit))
    assert argv[argv.index("--app") + 1] == APPS[unit], argv


def test_a_task_through_each_queue_comes_back_from_the_app_of_its_worker(host):
    answers = on_host(
        host,
        """
seen = {}
for queue in ["training", "extraction", "high_priority", "processing", "datasets", "low_priority"]:
    for _ in range(6):
        out = app.send_task("demo_app.tasks.whoami", queue=queue).get(timeout=60)
        seen[out["worker"].split("@")[0].split(".")[0]] = out["app"]
print(json.dumps(seen))
""",
    )
    # Every unit that answered ran its own app; each queue's worker answered at least once.
    assert {unit: APPS[unit] for unit in answers} == answers
    assert {"io", "hungry", "low"} <= set(answers), answers


def test_beat_runs_the_beat_app(host):
    pid = host.run("systemctl show -p MainPID --value celery-beat").stdout.strip()
    children = host.run(f"pgrep -P {pid}").stdout.split()
    argvs = [host.file(f"/proc/{c}/cmdline").content_string.split("\0") for c in children]
    [beat] = [a for a in argvs if "beat" in a]
    assert beat[beat.index("--app") + 1] == "demo_app.apps.beat", beat
    # And the ticks it sends were published by that app.
    ticks = on_host(
        host,
        """
import redis
r = redis.Redis.from_url(app.conf.broker_url, socket_timeout=5)
deadline = time.time() + 30
while time.time() < deadline and not r.lrange("demo:ticks", -1, -1):
    time.sleep(1)
print(json.dumps([t.decode() for t in r.lrange("demo:ticks", -5, -1)]))
""",
    )
    # Each tick record ends with the app that published it: `<dispatched> <id> <worker> <ran> <sender app>`.
    assert ticks and {t.split()[-1] for t in ticks} == {"demo_app.apps.beat"}, ticks
