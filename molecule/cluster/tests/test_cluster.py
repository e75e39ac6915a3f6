"""The fleet across hosts: private broker with auth, cross-host tasks, one beat leader, no duplicate ticks."""

from __future__ import annotations

import contextlib
import itertools
import math
import re

import pytest
from fleet_testing import (
    PATHS,
    VENV,
    exposure,
    fleet_json,
    fleet_secrets,
    journal,
    other,
    playbook,
    process_samples,
    redis_cli,
)

LOCK_KEY = "celery-fleet:beat-leader"
BROKER_ADDRESS = "172.30.78.10"

# Cluster-wide checks run once, from the broker; other hosts are reached through it.
testinfra_hosts = ["ansible://cluster-broker"]


@pytest.fixture(scope="module")
def broker(host):
    return host


@pytest.fixture(scope="module")
def worker(host):
    return other(host, "cluster-worker1")


@pytest.fixture(scope="module")
def beat_hosts(host):
    return [other(host, "cluster-beat1"), other(host, "cluster-beat2")]


@pytest.fixture(scope="module")
def settings(broker):
    return broker.ansible.get_variables()


def probe(host, **kwargs: str):
    """A PING to the broker from ``host`` as nobody, with redis-py's ``kwargs``; stderr tells what failed."""
    options = "".join(f", {name}={value!r}" for name, value in kwargs.items())
    return host.run(
        f'{VENV}/bin/python -c "import redis; '
        f"redis.Redis(host='{BROKER_ADDRESS}', socket_timeout=5, socket_connect_timeout=5{options}).ping()\""
    )


def test_a_plain_text_client_from_another_host_is_refused(worker):
    result = probe(worker)
    assert result.rc != 0
    assert "ConnectionError" in result.stderr, result.stderr


def test_a_tls_client_without_a_fleet_certificate_is_refused(worker):
    result = probe(worker, ssl=True, ssl_ca_certs=PATHS["tls_ca"])
    assert result.rc != 0
    assert "Error" in result.stderr and "AuthenticationError" not in result.stderr, result.stderr


def test_a_tls_client_with_the_hosts_certificate_must_still_log_in(worker):
    files = {"ssl_ca_certs": "tls_ca", "ssl_certfile": "tls_cert", "ssl_keyfile": "tls_key"}
    result = probe(worker, ssl=True, **{option: PATHS[path] for option, path in files.items()})
    assert result.rc != 0
    assert "AuthenticationError" in result.stderr, result.stderr


GPU_QUEUES = {"training", "extraction"}
CPU_QUEUES = {"high_priority", "datasets", "processing", "low_priority"}


def test_tasks_round_trip_across_hosts(beat_hosts):
    results = fleet_json(beat_hosts[0], f"{VENV}/bin/python -m demo_app.demo --timeout 60")
    assert set(results) == GPU_QUEUES | CPU_QUEUES
    for queue, [result] in results.items():
        assert "error" not in result, f"{queue}: {result}"
        assert result["hostname"] == ("cluster-worker2" if queue in GPU_QUEUES else "cluster-worker1")


def test_gpu_work_lands_on_a_pinned_gpu_of_the_gpu_host(beat_hosts):
    probe = fleet_json(
        beat_hosts[0],
        f"""{VENV}/bin/python -c 'import json; from demo_app.celery import app
paths = ["/dev/nvidia0", "/dev/nvidia1"]
r = app.send_task("demo_app.tasks.gpu_probe", queue="training", kwargs={{"paths": paths}})
print(json.dumps(r.get(timeout=60)))'""",
    )
    assert probe["hostname"] == "cluster-worker2"
    own = int(probe["cuda_visible_devices"])
    assert probe["devices"] == {f"/dev/nvidia{own}": "ENXIO", f"/dev/nvidia{1 - own}": "EPERM"}, probe


def test_flower_runs_on_its_own_host_only(host):
    assert other(host, "cluster-flower").service("flower").is_running
    assert not host.service("flower").is_running


def beat_processes(host) -> int:
    """`celery beat` processes, not counting the supervisor whose argv names it."""
    argvs = [line.split() for line in host.run("ps -eo args=").stdout.splitlines()]
    return len([a for a in argvs if len(a) > 2 and a[1].endswith("/bin/celery") and "beat" in a])


def test_exactly_one_beat_runs_fleet_wide_and_the_lease_names_it(worker, settings, beat_hosts):
    running = {h.backend.host: beat_processes(h) for h in beat_hosts}
    assert sum(running.values()) == 1, running
    [leader] = [name for name, count in running.items() if count]
    holder = redis_cli(worker, settings, "GET", LOCK_KEY).stdout
    assert f"host={leader} " in holder, holder


def test_every_candidate_runs_the_supervisor(beat_hosts):
    for host in beat_hosts:
        assert host.service("celery-beat").is_running, journal(host, "celery-beat")


def ticks(worker, settings) -> list[float]:
    """The recorded ticks, read as the fleet's admin from a worker host (the broker host has no client)."""
    lines = redis_cli(worker, settings, "LRANGE", "demo:ticks", "0", "-1").stdout.splitlines()
    return sorted(float(line.split()[0]) for line in lines if line.strip())


def test_at_most_one_dispatch_per_slot(worker, settings):
    period = float(settings["celery_app_env"]["DEMO_TICK_SECONDS"])
    times = ticks(worker, settings)
    assert len(times) >= 5, "beat dispatched too few ticks to judge"
    slots = [math.floor(t / period) for t in times]
    duplicates = sorted({s for s in slots if slots.count(s) > 1})
    assert duplicates == [], f"slots dispatched twice: {[s * period for s in duplicates]}"


def test_no_gap_longer_than_the_lease_ttl_plus_a_few_seconds(worker, settings):
    ttl = settings["celery_beat_lock_ttl"]
    times = ticks(worker, settings)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= ttl + 6, f"longest gap {max(gaps):.1f} s"


def test_beat_unit_exposure_is_under_its_bar(beat_hosts):
    # The one-host bar, though here beat reaches another host over TLS, with a key it reads as a group member.
    for host in beat_hosts:
        assert exposure(host, "celery-beat.service") <= 1.0, host.backend.host


def test_flower_unit_exposure_is_under_its_bar(host):
    # Flower on its own host: TLS to the broker on another, with the key as a group member.
    assert exposure(other(host, "cluster-flower"), "flower.service") <= 1.0


HOSTS = [
    "cluster-broker",
    "cluster-worker1",
    "cluster-worker2",
    "cluster-flower",
    "cluster-beat1",
    "cluster-beat2",
]


def test_a_converge_and_a_verify_at_vvv_show_no_secret_anywhere(host, hostvars, tmp_path):
    """Every host's process list sampled every 0.1 s through a whole converge (site.yml, its verify
    included) at -vvv; cluster-worker1 is reached over SSH as a sudo user, so its samples hold what sudo
    runs, and its journal what sudo logs. The verify also proves every worker on both worker hosts, one
    leader of two candidates, and Flower on its own host seeing them all. This converge is the scenario's
    second, so it is also its idempotence check: it changes nothing on any host."""
    sudo_host = other(host, "cluster-worker1")
    since = sudo_host.check_output("date '+%Y-%m-%d %H:%M:%S'")
    # After the side effects (the second verify), the verify alone: the converge was sampled before.
    again = host.file("/var/lib/celery-fleet-test-side-effects-done").exists
    names = ["playbooks/verify.yml"] if again else ["site.yml"]
    with contextlib.ExitStack() as stack:
        for name in HOSTS:
            stack.enter_context(process_samples(name, tmp_path / f"{name}.ps"))
        runs = [playbook(name, host.backend.ansible_inventory, verbosity=3) for name in names]
    for run in runs:
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    if not again:
        recap = dict(re.findall(r"^(cluster-\S+)\s+:.*\bchanged=(\d+)", runs[0].stdout, re.MULTILINE))
        assert sorted(recap) == sorted(HOSTS), runs[0].stdout[-3000:]
        assert set(recap.values()) == {"0"}, f"the second converge changed something: {recap}"
    samples = {name: (tmp_path / f"{name}.ps").read_text(errors="replace") for name in HOSTS}
    assert "sudo -H -S -n" in samples["cluster-worker1"], "the sampler saw what sudo runs"
    logs = sudo_host.check_output(f"journalctl --no-pager --since '{since}' -o cat")
    assert "COMMAND=" in logs, "sudo logged what it ran"
    output = "".join(run.stdout + run.stderr for run in runs)
    for secret in fleet_secrets(hostvars):
        assert secret not in output
        assert secret not in logs
        for name, seen in samples.items():
            assert secret not in seen, name
