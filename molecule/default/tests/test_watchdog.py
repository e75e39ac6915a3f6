"""Readiness and the watchdog of the worker units (celery-fleet-worker), on the real host.

Last of the scenario's tests (it stops the broker for a while and kills a worker). The scenario sets
celery_worker_watchdog_sec to 10; every wait below is bounded by what the units promise: WatchdogSec,
TimeoutAbortSec (10), RestartSec and the start's own TimeoutStartSec (celery_worker_ready_timeout).
"""

from __future__ import annotations

import json
import time

from fleet_testing import FLEET_ENV, VENV, on_host, show, worker_unit

WATCHDOG = 10  # celery_worker_watchdog_sec in molecule.yml; each test checks that its unit has it
ABORT = 10


def restarts(host, unit: str) -> int:
    return int(show(host, unit, "NRestarts")["NRestarts"])


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"not {what} within {seconds} s")


def send(host, queue: str, seconds: float) -> str:
    return on_host(
        host,
        f"r = app.send_task('demo_app.tasks.sleep', args=[{seconds}], queue='{queue}')\n"
        "print(json.dumps(r.id))",
    )


def result(host, task_id: str, timeout: int) -> dict:
    return on_host(
        host, f"print(json.dumps(app.AsyncResult('{task_id}').get(timeout={timeout})))", timeout=timeout + 30
    )


def since(host) -> str:
    return host.check_output("date '+%Y-%m-%d %H:%M:%S'")


def log(host, unit: str, start: str) -> str:
    return host.run(f"journalctl -u {unit} --since '{start}' --no-pager -o cat").stdout


def test_a_worker_turns_active_only_once_it_consumes_and_an_outage_is_no_hang(host):
    unit = worker_unit(host, "high")
    others = {name: worker_unit(host, name) for name in ("datasets", "processing", "gpu", "low")}
    before = {u: restarts(host, u) for u in others.values()}
    assert show(host, unit, "Type")["Type"] == "notify"
    host.run("systemctl stop redis-server")
    try:
        host.run(f"systemctl restart --no-block {unit}")
        # Longer than WatchdogSec: the restarted unit waits for the broker, not active; the others,
        # reconnecting, are no hung loop.
        time.sleep(WATCHDOG + 5)
        assert show(host, unit, "ActiveState")["ActiveState"] == "activating"
    finally:
        host.run("systemctl start redis-server")
    wait_until(lambda: show(host, unit, "ActiveState")["ActiveState"] == "active", 120, f"{unit} active")
    assert {u: restarts(host, u) for u in others.values()} == before
    # Active means consuming: a task sent now comes back from it.
    task = send(host, "high_priority", 0.1)
    assert result(host, task, 60)["slept"] == 0.1


def test_a_worker_that_never_gets_ready_fails_its_start_with_a_clear_line(host):
    unit = worker_unit(host, "low")
    dropin = f"/run/systemd/system/{unit}.d"
    start = since(host)
    # A broker address where nothing listens, read after the unit's own environment files.
    conf = "[Service]\\nEnvironmentFile=/run/test-no-broker.env\\nTimeoutStartSec=8\\n"
    host.run(
        f"mkdir -p {dropin} && printf 'CELERY_BROKER_URL=redis://127.0.0.1:9/0\\n' > /run/test-no-broker.env"
        f" && printf '{conf}' > {dropin}/test.conf && systemctl daemon-reload"
    )
    try:
        failed = host.run(f"systemctl restart {unit}")
        assert failed.rc != 0
        lines = log(host, unit, start)
        assert "start operation timed out" in lines, lines[-3000:]
        assert "Cannot connect to redis://:**@127.0.0.1:9/0" in lines, lines[-3000:]
    finally:
        host.run(
            f"rm -rf {dropin} /run/test-no-broker.env && systemctl daemon-reload && systemctl restart {unit}"
        )
    assert show(host, unit, "ActiveState")["ActiveState"] == "active"


def test_a_hung_loop_is_killed_and_restarted_its_task_redone_while_a_long_solo_task_runs_on(host):
    hung = worker_unit(host, "processing")
    solo = worker_unit(host, "gpu")
    for unit in (hung, solo):
        assert show(host, unit, "WatchdogUSec")["WatchdogUSec"] == f"{WATCHDOG}s", unit
    solo_restarts = restarts(host, solo)
    start = since(host)
    # Longer than the watchdog on the solo pool, whose loop runs the task itself.
    long_task = send(host, "training", 3 * WATCHDOG)
    # Long enough to be still running when the hung unit's children are killed.
    task = send(host, "processing", 2 * (WATCHDOG + ABORT))
    wait_until(lambda: "demo_app.tasks.sleep" in log(host, hung, start), 30, "the task started")
    main_pid = show(host, hung, "MainPID")["MainPID"]
    count = restarts(host, hung)
    # The main process only: its loop stops, the pool's children go on.
    host.run(f"kill -STOP {main_pid}")
    wait_until(lambda: restarts(host, hung) > count, WATCHDOG + ABORT + 30, "restarted by the watchdog")
    lines = log(host, hung, start)
    assert "Watchdog timeout" in lines, lines[-3000:]
    done = result(host, task, 180)
    assert done["slept"] == 2 * (WATCHDOG + ABORT)
    assert "handed 1 message(s)" in log(host, hung, start)
    assert result(host, long_task, 120)["slept"] == 3 * WATCHDOG
    assert restarts(host, solo) == solo_restarts
    assert "Watchdog timeout" not in log(host, solo, start)
    # The hung unit's task ran to its end exactly once: the killed run never finished.
    runs = host.check_output(
        f"{FLEET_ENV}; {VENV}/bin/python -c "
        '"import json, redis, os; print(json.dumps([r.decode() for r in '
        "redis.Redis.from_url(os.environ['CELERY_BROKER_URL']).lrange('demo:runs', 0, -1)]))\""
    )
    assert json.loads(runs).count(task) == 1
