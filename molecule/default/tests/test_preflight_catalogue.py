"""A catalogue of invalid inventories: site.yml refuses each one with a message naming the host,
the variable and the fix, and leaves the host exactly as it was."""

from __future__ import annotations

import time

import pytest
import yaml
from fleet_testing import VENV, fleet_json, journal, playbook, snapshot

HOST = "celery-fleet-default"
GROUPS = ("celery_broker", "celery_workers", "celery_beat", "celery_flower")
BASE_VARS = ("redis_password", "flower_user", "flower_password", "celery_app_env", "celery_workers")


def workers(hostvars, **changes) -> list[dict]:
    """The scenario's worker list with some entries changed (None drops the entry)."""
    out = []
    for entry in hostvars["celery_workers"]:
        change = changes.get(entry["name"], {})
        if change is not None:
            out.append({**entry, **change})
    return out


# (case id, groups without the host, variables, fragments the error must contain)
CASES = [
    (
        "unknown pool",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"pool": "forking"})},
        ["celery_workers[high].pool 'forking'", "Fix"],
    ),
    (
        "negative concurrency",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"concurrency": -2})},
        ["celery_workers[high].concurrency -2", "Fix"],
    ),
    (
        "size that does not parse",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"memory_max": "4 gigs"})},
        ["celery_workers[high].memory_max '4 gigs' is not a size", "Fix"],
    ),
    (
        "memory_high above memory_max",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"memory_max": "1G", "memory_high": "2G"})},
        ["celery_workers[high].memory_high 2G is above memory_max 1G", "Fix"],
    ),
    (
        "duplicate worker names",
        (),
        lambda hv: {"celery_workers": [*workers(hv), {"name": "high", "queues": ["high_priority"]}]},
        ["celery_workers[5].name 'high' is used twice", "Fix"],
    ),
    (
        "GPU the host does not have",
        (),
        lambda hv: {"celery_workers": workers(hv, gpu={"gpus": [5]})},
        ["celery_workers[gpu].gpus 5 is not on this host", "Fix"],
    ),
    (
        "one GPU for two units",
        (),
        lambda hv: {"celery_workers": workers(hv, gpu={"gpus": [0]}, low={"gpus": [0]})},
        ["/dev/nvidia0 is pinned to 2 units (gpu, low)", "gpu_sharing", "Fix"],
    ),
    (
        "stop_timeout shorter than time_limit",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"time_limit": 900, "stop_timeout": 60})},
        ["celery_workers[low].stop_timeout 60 is shorter than time_limit 900", "Fix"],
    ),
    (
        "soft limit not below the hard one",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"time_limit": 100, "soft_time_limit": 100})},
        ["celery_workers[low].soft_time_limit 100 must be below time_limit 100", "Fix"],
    ),
    (
        "beat embedded in a worker",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["-B"]})},
        ["celery_workers[low].extra_args embeds beat", "Fix"],
    ),
    (
        "a misspelt field",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"concurency": 2})},
        ["celery_workers[low] has unknown fields concurency", "Fix"],
    ),
    (
        "autoscale on a thread pool",
        (),
        lambda hv: {
            "celery_workers": workers(hv, datasets={"autoscale": {"min": 1, "max": 4}, "concurrency": None})
        },
        ["celery_workers[datasets].autoscale needs pool prefork", "Fix"],
    ),
    (
        "CPUs the host does not have",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"cpus": "0-63"})},
        ["celery_workers[high].cpus '0-63' names CPU 63", "Fix"],
    ),
    (
        "memory limits above the host's RAM",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"memory_max": "4T"})},
        [f"{HOST}: the memory_max of its celery_workers adds up to", "Fix"],
    ),
    (
        "no beat candidate",
        ("celery_beat",),
        lambda hv: {},
        ["fleet: the celery_beat group has no host", "Fix"],
    ),
    ("no broker", ("celery_broker",), lambda hv: {}, ["fleet: the celery_broker group has 0 hosts", "Fix"]),
    (
        "empty broker password",
        (),
        lambda hv: {"redis_password": ""},
        ["redis_password is empty, a placeholder", "Fix"],
    ),
    (
        "default broker password",
        (),
        lambda hv: {"redis_password": "changeme"},
        ["redis_password is empty, a placeholder", "Fix"],
    ),
    (
        "Flower without auth",
        (),
        lambda hv: {"flower_password": ""},
        ["Flower needs auth", "flower_password", "Fix"],
    ),
    (
        "Flower with admin:admin",
        (),
        lambda hv: {"flower_user": "admin", "flower_password": "admin"},
        ["Flower needs auth", "flower_password", "Fix"],
    ),
    (
        "a queue no worker consumes",
        (),
        lambda hv: {"celery_workers": workers(hv, low=None)},
        ["fleet: queue 'low_priority' has no worker", "Fix"],
    ),
    (
        "stop_timeout beyond the visibility timeout",
        (),
        lambda hv: {"celery_workers": workers(hv, gpu={"stop_timeout": 9000})},
        ["visibility", "stop_timeout", "Fix"],
    ),
    (
        "a broker address that is not the host's",
        (),
        lambda hv: {"redis_private_address": "192.0.2.99"},
        ["redis_private_address 192.0.2.99 is not an address of this host", "Fix"],
    ),
    (
        "beat lease renewed too late",
        (),
        lambda hv: {"celery_beat_lock_renew_interval": 6},
        ["celery_beat_lock_renew_interval (6)", "Fix"],
    ),
]


def inventory(hostvars, variables: dict | None = None, without: tuple[str, ...] = ()) -> dict:
    """The scenario's one host in every group but ``without``, with its variables changed by ``variables``."""
    return {
        "all": {
            "vars": {
                "ansible_connection": "community.docker.docker",
                **{k: hostvars[k] for k in BASE_VARS},
                **(variables or {}),
            },
            "children": {g: {"hosts": {HOST: None}} for g in GROUPS if g not in without},
        }
    }


def assert_refused(host, inventory: dict, tmp_path, name: str, fragments: list[str]) -> None:
    """site.yml fails on ``inventory`` with a message holding every fragment, and the host is unchanged."""
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    before = snapshot(host)
    run = playbook("site.yml", tmp_path / "hosts.yml")
    output = run.stdout + run.stderr
    assert run.returncode != 0, f"{name}: site.yml accepted it\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in output, f"{name}: {fragment!r} missing from\n{output[-3000:]}"
    # The message itself names the host, or the fleet for a fleet-wide problem.
    assert f"{HOST}: " in output or "fleet: " in output, output[-3000:]
    assert snapshot(host) == before, f"{name}: the host changed"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_site_refuses_an_invalid_inventory_and_changes_nothing(host, hostvars, tmp_path, case):
    name, without, variables, fragments = case
    assert_refused(host, inventory(hostvars, variables(hostvars), without), tmp_path, name, fragments)


def test_site_refuses_two_worker_hosts_with_one_hostname(host, hostvars, tmp_path):
    # A second inventory host reaching the same machine: two cloned VMs that kept their template's hostname.
    twin = "celery-fleet-twin"
    hosts = inventory(hostvars)
    hosts["all"]["children"]["celery_workers"]["hosts"][twin] = {"ansible_host": HOST}
    fragments = [f"fleet: worker hosts {HOST}, {twin} share the hostname", "Fix"]
    assert_refused(host, hosts, tmp_path, "shared hostname", fragments)


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ("celery-worker@low", f"{HOST}: celery-worker@low.service is inactive (dead)"),
        (
            "celery-beat",
            f"{HOST}: celery-beat.service is inactive (dead), so this candidate can neither lead",
        ),
    ],
    ids=["worker", "beat"],
)
def test_verify_catches_a_unit_stopped_by_hand(host, hostvars, tmp_path, unit, message):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(hostvars)))
    assert playbook("playbooks/verify.yml", tmp_path / "hosts.yml").returncode == 0
    host.run(f"systemctl stop {unit}")
    try:
        run = playbook("playbooks/verify.yml", tmp_path / "hosts.yml")
    finally:
        host.run(f"systemctl start {unit}")
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert message in output, output[-3000:]
    assert "Traceback" not in output


def test_verify_catches_a_worker_started_by_hand(host, hostvars, tmp_path):
    # The seed's classic: `celery worker` started by hand without -Q, consuming only `celery`.
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(hostvars)))
    node = f"by-hand@{host.check_output('hostname')}"
    unit = "celery-fleet-test-by-hand"
    started = host.run(
        f"systemd-run --unit={unit} --working-directory=/tmp "
        "--property=EnvironmentFile=/etc/celery-fleet/celery.env "
        "--property=EnvironmentFile=/etc/celery-fleet/broker.env "
        f"{VENV}/bin/celery --app demo_app worker --hostname={node} --queues=celery --pool=solo"
    )
    assert started.rc == 0, started.stderr
    try:
        for _ in range(30):
            if node in fleet_json(host, f"{VENV}/bin/celery-fleet-status --fleet")["nodes"]:
                break
            time.sleep(2)
        else:
            pytest.fail(f"{node} never answered:\n{journal(host, unit)}")
        run = playbook("playbooks/verify.yml", tmp_path / "hosts.yml")
    finally:
        host.run(f"systemctl stop {unit}")
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert f"fleet: {node} consumes celery; no celery_workers entry on any host runs it" in output, output[
        -3000:
    ]
    assert "Traceback" not in output
