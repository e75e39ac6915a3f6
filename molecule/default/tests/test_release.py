"""Day 2 under load: a release rolls out with no gap, no loss and no repeat; rollback does the same;
a broken release stops at its canary; a drain that would orphan a queue is refused.

Every queue gets a short `record` task every LOAD_INTERVAL seconds throughout, two of them also
seconds-long ones, and `processing` (one unit, two processes) one long task that outlasts the
rollout. Each task appends its id, queue, start time and release to demo:records.

The tests run in order and share the fleet's state: v2 rolls out over the converged v1, the
rollback returns to v1, a drain that would orphan every queue is refused, a paused queue keeps its
task until it is resumed, a forced drain holds until undrain, and last the broken v3 is refused at
the canary with v1 still serving.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml
from fleet_testing import (
    FLEET_ENV,
    PATHS,
    ROOT,
    STATUS,
    fleet_json,
    fleet_secrets,
    journal,
    playbook,
    process_samples,
    redis_cli,
)
from test_preflight_catalogue import HOST, inventory

QUEUES = ["high_priority", "datasets", "processing", "training", "extraction", "low_priority"]
LOAD_INTERVAL = 0.5
# Kombu's Redis transport waits for a message with BRPOP for at most 1 s before it polls again.
BROKER_POLL = 1.0
# A consumer with a free process takes a queued task within one broker poll, and a task is queued
# every LOAD_INTERVAL, so consecutive starts on a queue are at most one interval and one poll apart
# while it has a consumer. The bound allows four such periods (a prefork child being replaced after
# max_tasks_per_child, a busy 2-core host); a queue without a consumer during the rollout waits as
# long as its unit drains: the long task, LONG_TASK seconds, an order of magnitude above.
GAP_BOUND = 4 * (LOAD_INTERVAL + BROKER_POLL)
LONG_TASK = 75.0
LOAD_UNIT = "celery-fleet-test-load"


def status(host) -> dict:
    return fleet_json(host, STATUS)


def worker_releases(host) -> dict[str, str]:
    """The release each serving worker unit runs."""
    return {u["unit"]: u["release"] for u in status(host)["units"] if u["node"] and u["active"] == "active"}


def current_release(host) -> str:
    return Path(host.check_output(f"readlink {PATHS['venv']}")).name


def under_load(
    host, tmp_path: Path, name: str, extra_vars: dict | None = None, verbosity: int = 0
) -> tuple[object, dict]:
    """Run playbook ``name`` while the load runs, sampling the host's process list; return the run and
    the load's verdict (with the samples' file)."""
    release = f"{PATHS['releases']}/{current_release(host)}"
    env = f"--property=EnvironmentFile={PATHS['app_env']} --property=EnvironmentFile={PATHS['broker_env']}"
    host.run("rm -f /tmp/load.stop /tmp/load-sent.json")
    load = [
        f"{release}/bin/python",
        "-m",
        "demo_app.load",
        "send",
        f"--queues={','.join(QUEUES)}",
        f"--interval={LOAD_INTERVAL}",
        "--medium-queues=high_priority,datasets",
        "--long-queue=processing",
        f"--long={LONG_TASK}",
        "--stop-file=/tmp/load.stop",
        "--sent=/tmp/load-sent.json",
    ]
    started = host.run(f"systemd-run --unit={LOAD_UNIT} --working-directory=/tmp {env} {' '.join(load)}")
    assert started.rc == 0, started.stderr
    try:
        # The long task is running before anything changes.
        for _ in range(30):
            if "Task demo_app.tasks.record" in journal(host, "'celery-worker@processing.*'"):
                break
            time.sleep(1)
        time.sleep(2)
        since = float(host.check_output("date +%s.%N"))
        (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(host.hostvars)))
        with process_samples(host.backend.host, tmp_path / "ps.txt"):
            run = playbook(name, tmp_path / "hosts.yml", extra_vars=extra_vars, verbosity=verbosity)
        until = float(host.check_output("date +%s.%N"))
    finally:
        host.run("touch /tmp/load.stop")
        for _ in range(30):
            if host.run(f"systemctl is-active {LOAD_UNIT}").stdout.strip() != "active":
                break
            time.sleep(1)
    verdict = fleet_json(
        host,
        f"sh -c '{FLEET_ENV}; {release}/bin/python -m demo_app.load check --sent /tmp/load-sent.json "
        f"--since {since} --until {until} --timeout {LONG_TASK + 120}'",
    )
    verdict["since"] = since
    verdict["ps"] = tmp_path / "ps.txt"
    return run, verdict


def assert_no_stall(verdict: dict, old: str) -> None:
    assert verdict["lost"] == [], f"{len(verdict['lost'])} tasks lost of {verdict['sent']}"
    assert verdict["duplicates"] == [], f"{len(verdict['duplicates'])} tasks ran twice"
    assert set(verdict["gaps"]) == set(QUEUES), verdict["gaps"]
    stalls = {q: g["gap"] for q, g in verdict["gaps"].items() if g["gap"] > GAP_BOUND}
    assert not stalls, f"queues went {stalls} s without a task start (bound {GAP_BOUND} s)"
    # The long task was running when the rollout began, and finished on the release it started on.
    long = verdict["long"]
    assert long is not None and long["started"] < verdict["since"], long
    assert long["release"] == old, long


@pytest.fixture(scope="module")
def host(host, hostvars):
    host.hostvars = hostvars
    return host


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    """The demo app as it is (v1, deployed), changed with the same version (v2), and broken (v3)."""
    base = tmp_path_factory.mktemp("releases")
    out = {}
    for name in ("v2", "v3"):
        shutil.copytree(ROOT / "examples/demo_app", base / name, ignore=shutil.ignore_patterns("__pycache__"))
        tasks = base / name / "src/demo_app/tasks.py"
        tasks.write_text(tasks.read_text() + f'\nRELEASE_NOTE = "{name}"\n')
        out[name] = base / name
    # v3 imports on the controller (preflight passes) but no worker can start it, as when a host
    # lacks a library the controller has.
    app = out["v3"] / "src/demo_app/celery.py"
    app.write_text(
        app.read_text()
        + '\nimport sys  # noqa: E402\n\nif "worker" in sys.argv:\n'
        + '    raise ImportError("this release cannot start a worker")\n'
    )
    return out


@pytest.fixture(scope="module")
def history() -> dict[str, str]:
    return {}


def test_a_release_rolls_out_with_no_gap_no_loss_and_no_repeat(host, tmp_path, releases, history):
    old = current_release(host)
    sources = {"celery_app_sources": [str(releases["v2"])]}
    run, verdict = under_load(host, tmp_path, "site.yml", sources, verbosity=3)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    # A whole converge and its verify, at -vvv: no secret in any process list of the host, sampled
    # every 0.1 s throughout, nor in the output.
    samples = verdict["ps"].read_text(errors="replace")
    assert samples.count("celery-fleet-canary") > 0, "the sampler saw the rollout"
    for secret in fleet_secrets(host.hostvars):
        assert secret not in samples
        assert secret not in output
    new = current_release(host)
    assert new != old
    assert_no_stall(verdict, old)
    # The rollout began with the canary, and every worker now runs the new release.
    assert "rollout.yml for celery-fleet-default => (item=canary)" in output, output[-4000:]
    assert set(worker_releases(host).values()) == {new}, worker_releases(host)
    history.update(v1=old, v2=new)


def test_rollback_returns_to_the_previous_release_the_same_way(host, tmp_path, history):
    assert history, "needs the release before"
    cache = ROOT / ".cache/wheelhouse"
    archives = {p.name: p.stat().st_mtime for p in cache.glob("*.tar.gz")}
    run, verdict = under_load(host, tmp_path, "playbooks/rollback.yml")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert current_release(host) == history["v1"]
    assert_no_stall(verdict, history["v2"])
    assert set(worker_releases(host).values()) == {history["v1"]}
    # Nothing was built (no wheelhouse, no package index): the controller's cache is as it was.
    assert {p.name: p.stat().st_mtime for p in cache.glob("*.tar.gz")} == archives


def test_a_drain_that_would_leave_a_queue_without_a_consumer_is_refused(host, tmp_path):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(host.hostvars)))
    before = worker_releases(host)
    run = playbook("playbooks/drain.yml", tmp_path / "hosts.yml", limit=HOST)
    output = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0
    assert f"fleet: draining {HOST} would leave" in output, output[-3000:]
    for queue in QUEUES:
        assert queue in output
    assert "-e drain_force=true" in output
    assert not host.file(f"{PATHS['config_dir']}/drained").exists
    assert worker_releases(host) == before


def test_a_paused_queue_keeps_its_tasks_until_it_is_resumed(host, tmp_path):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(host.hostvars)))
    queues = {"queues": "low_priority"}
    pause = playbook("playbooks/pause.yml", tmp_path / "hosts.yml", extra_vars=queues)
    assert pause.returncode == 0, (pause.stdout + pause.stderr)[-3000:]
    python = f"{PATHS['releases']}/{current_release(host)}/bin/python"
    send = (
        "import sys; from demo_app.tasks import record; "
        "print(record.apply_async(args=[0], queue=sys.argv[1]).id)"
    )
    sent = host.check_output(f"sh -c '{FLEET_ENV}; {python} -c \"{send}\" low_priority'")
    try:
        # Several broker polls later, the task still waits in its queue (beat's ticks queue up there too).
        time.sleep(4 * BROKER_POLL)
        assert int(redis_cli(host, host.hostvars, "llen", "low_priority").stdout) >= 1
        assert sent not in redis_cli(host, host.hostvars, "lrange", "demo:records", "-50", "-1").stdout
        shown = playbook("playbooks/status.yml", tmp_path / "hosts.yml")
        assert "Paused queues (playbooks/pause.yml): low_priority" in shown.stdout, shown.stdout[-3000:]
        verify = playbook("playbooks/verify.yml", tmp_path / "hosts.yml")
        assert verify.returncode == 0, (verify.stdout + verify.stderr)[-3000:]
    finally:
        resume = playbook("playbooks/resume.yml", tmp_path / "hosts.yml", extra_vars=queues)
    assert resume.returncode == 0, (resume.stdout + resume.stderr)[-3000:]
    for _ in range(30):
        if sent in redis_cli(host, host.hostvars, "lrange", "demo:records", "-20", "-1").stdout:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the task sent to the paused queue never ran after resume.yml ({sent})")
    low = [
        u
        for u in status(host)["units"]
        if u["unit"].startswith("celery-worker@low.") and u["active"] == "active"
    ]
    assert [u["queues"] for u in low] == [["low_priority"]], low


def test_a_forced_drain_stops_the_workers_until_undrain_and_the_deploy_keeps_it(host, tmp_path):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(host.hostvars)))
    serving = sorted(worker_releases(host))
    assert serving, "no worker serves before the drain"
    force = {"drain_force": True}
    drain = playbook("playbooks/drain.yml", tmp_path / "hosts.yml", extra_vars=force, limit=HOST)
    assert drain.returncode == 0, (drain.stdout + drain.stderr)[-3000:]
    try:
        assert worker_releases(host) == {}
        assert host.file(f"{PATHS['config_dir']}/drained").exists
        assert not host.run("ls /etc/systemd/system/celery.target.wants/ | grep celery-worker@").stdout
        # The workers play (what site.yml runs for them) keeps the host drained, and says so.
        workers = playbook("playbooks/workers.yml", tmp_path / "hosts.yml")
        output = " ".join((workers.stdout + workers.stderr).split())
        assert workers.returncode == 0, output[-3000:]
        assert f"{HOST} is drained" in output and f"playbooks/undrain.yml -l {HOST}" in output, output[-3000:]
        assert worker_releases(host) == {}
    finally:
        undrain = playbook("playbooks/undrain.yml", tmp_path / "hosts.yml", limit=HOST)
    assert undrain.returncode == 0, (undrain.stdout + undrain.stderr)[-3000:]
    assert not host.file(f"{PATHS['config_dir']}/drained").exists
    assert len(worker_releases(host)) == len(serving)


# Last: after it the `venv` link names the broken release until a rollback or a fixed deploy.
def test_a_broken_release_stops_at_the_canary_and_the_old_keeps_serving(host, tmp_path, releases, history):
    assert history, "needs the releases before"
    before = worker_releases(host)
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(host.hostvars)))
    run = playbook(
        "site.yml",
        tmp_path / "hosts.yml",
        extra_vars={"celery_app_sources": [str(releases["v3"])], "celery_app_keep_releases": 2},
    )
    output = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0
    # The canary unit's start fails: it exits before it is ready (READY=1 comes after the first consume).
    assert f"{HOST}: the rollout stopped at the canary: Unable to start service celery-worker@" in output, (
        output[-3000:]
    )
    assert "still serve on their release" in output and "Fix:" in output
    # The same units still serve, on the same release, and a task goes through every queue.
    assert worker_releases(host) == before
    demo = fleet_json(
        host,
        f"sh -c '{FLEET_ENV}; {PATHS['releases']}/{history['v1']}/bin/python -m demo_app.demo --timeout 60'",
    )
    assert all("error" not in r for results in demo.values() for r in results), demo
    # Two releases kept: the broken one just installed and v1, which was current before; v2 is gone.
    left = host.check_output(f"ls {PATHS['releases']}").split()
    assert history["v2"] not in left and history["v1"] in left and len(left) == 2, left
