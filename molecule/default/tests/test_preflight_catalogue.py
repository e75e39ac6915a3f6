"""A catalogue of invalid inventories: site.yml refuses each one with a message naming the host,
the variable and the fix, and leaves the host exactly as it was."""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from fleet_testing import PATHS, STATUS, VENV, fleet_json, journal, playbook, snapshot, worker_unit

HOST = "celery-fleet-default"
TWIN = "celery-fleet-twin"
# Cases run at once: each is a controller process waiting on docker exec, so a few overlap well on 2 cores.
PARALLEL = 4
GROUPS = ("celery_broker", "celery_workers", "celery_beat", "celery_flower")
BASE_VARS = (
    "redis_password",
    "flower_user",
    "flower_password",
    "celery_app_env",
    "celery_workers",
    "celery_worker_watchdog_sec",
)
"""The catalogue of invalid inventories. Every case must be refused by site.yml before any host changes,
with a message that starts with the host or `fleet:`, names the variable and says how to fix it."""


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
        ["value of pool must be one of", "got: forking", "celery_workers", "Fix"],
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
        ["celery_workers[low].extra_args turns on a beat inside the worker (beat)", "Fix"],
    ),
    (
        "a misspelt field",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"concurency": 2})},
        ["celery_workers.concurency", "Supported parameters include", "Fix"],
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
    # Beat and owned flags through extra_args, in spellings Celery's own parser accepts.
    (
        "beat in its long spelling",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--beat"]})},
        ["celery_workers[low].extra_args turns on a beat inside the worker (beat)", "Fix"],
    ),
    (
        "beat in combined short flags",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["-EB"]})},
        ["celery_workers[low].extra_args turns on a beat inside the worker (beat)", "Fix"],
    ),
    (
        "beat's schedule on a worker",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["-s", "/tmp/schedule"]})},
        ["celery_workers[low].extra_args turns on a beat inside the worker (schedule_filename)", "Fix"],
    ),
    (
        "beat through the worker's environment",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"env": {"CELERY_WORKER_BEAT": "1"}})},
        ["celery_workers[low].env.CELERY_WORKER_BEAT is the fleet's to set", "Fix"],
    ),
    (
        "beat through the fleet's environment",
        (),
        lambda hv: {"celery_app_env": {"CELERY_WORKER_BEAT": "true"}},
        ["celery_app_env.CELERY_WORKER_BEAT is the fleet's to set", "Fix"],
    ),
    (
        "queues overridden in a glued short option",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["-Qhigh_priority"]})},
        ["celery_workers[low].extra_args sets queues, which the entry's queues field owns", "Fix"],
    ),
    (
        "queues dropped with --exclude-queues",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--exclude-queues=low_priority"]})},
        ["celery_workers[low].extra_args sets exclude_queues, which the entry's queues field owns", "Fix"],
    ),
    (
        "a second hostname",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["-n", "other@host"]})},
        ["celery_workers[low].extra_args sets hostname, which the entry's name field owns", "Fix"],
    ),
    (
        "concurrency and pool overridden",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--concurrency=64", "-Pthreads"]})},
        ["sets concurrency, which the entry's concurrency field owns", "sets pool", "Fix"],
    ),
    (
        "an option and its value in one argument",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--queues high_priority"]})},
        [
            "celery_workers[low].extra_args ['--queues high_priority'] is refused by `celery worker`'s own",
            "Fix",
        ],
    ),
    (
        "an option Celery does not have",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--no-such-option"]})},
        ["is refused by `celery worker`'s own parser", "Fix"],
    ),
    (
        "app settings overridden on the command line",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["broker_url=redis://elsewhere"]})},
        ["celery_workers[low].extra_args ends with ['broker_url=redis://elsewhere']", "app settings", "Fix"],
    ),
    (
        "detach from systemd",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--detach"]})},
        ["sets detach, which the unit owns", "Fix"],
    ),
    (
        "purge the queues at every start",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--discard"]})},
        ["sets purge, which the unit owns", "Fix"],
    ),
    (
        "an extra argument with a newline",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"extra_args": ["--without-gossip\n-B"]})},
        ["celery_workers[low].extra_args", "control character", "Fix"],
    ),
    # The environment the unit sets itself.
    (
        "the app overridden through env",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"env": {"CELERY_APP": "other"}})},
        ["celery_workers[low].env.CELERY_APP is the fleet's to set", "Fix"],
    ),
    (
        "the broker overridden through env",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"env": {"CELERY_BROKER_URL": "redis://elsewhere"}})},
        ["celery_workers[low].env.CELERY_BROKER_URL is the fleet's to set", "Fix"],
    ),
    (
        "the app through Celery's own APP variable",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"env": {"APP": "other"}})},
        ["celery_workers[low].env sets APP, which Celery's command line reads", "Fix"],
    ),
    (
        "the GPU pinning overridden through env",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"env": {"CUDA_VISIBLE_DEVICES": "0"}})},
        ["celery_workers[low].env.CUDA_VISIBLE_DEVICES is the fleet's to set", "gpus", "Fix"],
    ),
    (
        "Flower opened through the fleet's environment",
        (),
        lambda hv: {"celery_app_env": {"FLOWER_UNAUTHENTICATED_API": "true"}},
        ["celery_app_env.FLOWER_UNAUTHENTICATED_API is the fleet's to set", "Fix"],
    ),
    # Free-form worker fields.
    (
        "a log level Celery does not know",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"loglevel": "LOUD"})},
        ["celery_workers[low].loglevel 'LOUD' is not one of", "Fix"],
    ),
    (
        "a queue name with a comma",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"queues": ["low_priority,high_priority"]})},
        ["celery_workers[low].queues", "comma", "Fix"],
    ),
    (
        "an app that is no module path",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"app": "demo app"})},
        ["celery_workers[low].app 'demo app' is not a module path", "Fix"],
    ),
    (
        "a fleet app that is no module path",
        (),
        lambda hv: {"celery_fleet_app": "demo_app; rm -rf /"},
        ["celery_fleet_app 'demo_app; rm -rf /' is not a module path", "Fix"],
    ),
    (
        "an entry app that does not import",
        (),
        lambda hv: {"celery_workers": workers(hv, low={"app": "demo_app.apps.nowhere"})},
        ["demo_app.apps.nowhere", "Fix"],
    ),
    # Sizes: one grammar everywhere.
    (
        "a fraction with no unit",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"memory_max": "0.5"})},
        ["celery_workers[high].memory_max '0.5' is not a size; write a number and a unit", "Fix"],
    ),
    (
        "a bare number of bytes",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"memory_max": 4096})},
        ["celery_workers[high].memory_max 4096 is not a size", "512M", "Fix"],
    ),
    (
        "a per-child cap in bare KiB",
        (),
        lambda hv: {"celery_workers": workers(hv, processing={"max_memory_per_child": 200000})},
        ["celery_workers[processing].max_memory_per_child 200000 is not a size", "Fix"],
    ),
    (
        "a per-child cap that can never fire",
        (),
        lambda hv: {
            "celery_workers": workers(hv, processing={"memory_max": "512M", "max_memory_per_child": "1G"})
        },
        ["celery_workers[processing].max_memory_per_child 1G is not below memory_max 512M", "Fix"],
    ),
    (
        "a per-child cap on a thread pool",
        (),
        lambda hv: {"celery_workers": workers(hv, datasets={"max_memory_per_child": "100M"})},
        ["celery_workers[datasets].max_memory_per_child is set, but pool threads", "Fix"],
    ),
    (
        "a broker cap that does not parse",
        (),
        lambda hv: {"redis_maxmemory": "2 gigs"},
        ["redis_maxmemory '2 gigs' is not a size", "Fix"],
    ),
    (
        "a broker cap that is a bare fraction",
        (),
        lambda hv: {"redis_maxmemory": "0.5"},
        ["redis_maxmemory '0.5' is not a size", "Fix"],
    ),
    (
        "a broker cap above the host's RAM",
        (),
        lambda hv: {"redis_maxmemory": "64T"},
        ["redis_maxmemory 64T is more than the", "MiB of RAM of this host", "Fix"],
    ),
    (
        "the broker's cap pushes the host over its RAM",
        (),
        lambda hv: {
            "redis_maxmemory": "12G",
            "celery_workers": workers(hv, high={"memory_max": "12G"}, low={"memory_max": "2G"}),
        },
        ["the memory_max of its celery_workers adds up to", "the broker's redis_maxmemory", "Fix"],
    ),
    (
        "an overcommit ratio below one",
        (),
        lambda hv: {"celery_worker_memory_overcommit": 0.5},
        ["celery_worker_memory_overcommit 0.5", "Fix"],
    ),
    # Types, choices and formats of the other roles, before Redis is touched.
    (
        "a port that is not a number",
        (),
        lambda hv: {"redis_port": "redis"},
        ["argument 'redis_port' is of type str and we were unable to convert to int", "Fix"],
    ),
    (
        "a port out of range",
        (),
        lambda hv: {"redis_port": 70000},
        ["redis_port 70000 is not a TCP port", "Fix"],
    ),
    (
        "a Flower port that is not a number",
        (),
        lambda hv: {"flower_port": "http"},
        ["argument 'flower_port' is of type str", "Fix"],
    ),
    (
        "a broker address that is a host name",
        (),
        lambda hv: {"celery_app_broker_address": "broker.internal:6380/1"},
        ["celery_app_broker_address 'broker.internal:6380/1' is not an IPv4 address", "Fix"],
    ),
    (
        "a Flower client network with host bits",
        (),
        lambda hv: {"flower_allowed_clients": ["10.0.0.5/24"]},
        ["flower_allowed_clients '10.0.0.5/24' is not an IP network", "Fix"],
    ),
    (
        "a private Flower address nobody may reach",
        (),
        lambda hv: {"flower_address": "0.0.0.0"},
        ["flower_address 0.0.0.0 is not loopback, but flower_allowed_clients is empty", "Fix"],
    ),
    (
        "a beat stuck timeout too short to start beat",
        (),
        lambda hv: {"celery_beat_stuck_timeout": 1},
        ["celery_beat_stuck_timeout (1) from 2 to 86400", "Fix"],
    ),
    (
        "a worker watchdog shorter than the loop's ticks can meet",
        (),
        lambda hv: {"celery_worker_watchdog_sec": 4},
        ["celery_worker_watchdog_sec 4 whole seconds from 10 to 3600", "Fix"],
    ),
    (
        "a misspelt worker default",
        (),
        lambda hv: {"celery_worker_defaults": {"memmory_max": "1G"}},
        ["celery_worker_defaults has unknown fields memmory_max", "Fix"],
    ),
    (
        "a client port that is not a number",
        (),
        lambda hv: {"celery_app_broker_port": "six"},
        ["argument 'celery_app_broker_port' is of type str", "Fix"],
    ),
    (
        "an fsync policy Redis would lose writes with",
        (),
        lambda hv: {"redis_appendfsync": "no"},
        ["redis_appendfsync", "always, everysec", "Fix"],
    ),
    (
        "an eviction policy",
        (),
        lambda hv: {"redis_maxmemory_policy": "allkeys-lru"},
        ["redis_maxmemory_policy", "noeviction", "Fix"],
    ),
    (
        "a snapshot rule Redis cannot read",
        (),
        lambda hv: {"redis_save": ["every hour"]},
        ["redis_save ['every hour'] are not", "Fix"],
    ),
    (
        "a lease TTL that is not a number",
        (),
        lambda hv: {"celery_beat_lock_ttl": "ten"},
        ["argument 'celery_beat_lock_ttl' is of type str", "Fix"],
    ),
    (
        "a beat log level beat does not know",
        (),
        lambda hv: {"celery_beat_loglevel": "chatty"},
        ['celery_beat_loglevel "chatty"', "Fix"],
    ),
    (
        "beat's scheduler overridden from its extra arguments",
        (),
        lambda hv: {"celery_beat_extra_args": ["--scheduler=redbeat.RedBeatScheduler"]},
        ["celery_beat_extra_args sets scheduler", "celery_beat_scheduler", "Fix"],
    ),
    (
        "an argument Flower would drop without a word",
        (),
        lambda hv: {"flower_extra_args": ["--unauthenticated_api=true"]},
        ["flower_extra_args holds ['--unauthenticated_api=true'], which Flower ignores", "Fix"],
    ),
    (
        "Flower opened to the world from its extra arguments",
        (),
        lambda hv: {"flower_extra_args": ["--address=0.0.0.0"]},
        ["flower_extra_args sets address", "flower_address", "Fix"],
    ),
    (
        "a Flower address that is not an address",
        (),
        lambda hv: {"flower_address": "localhost --port=80"},
        ["flower_address 'localhost --port=80' is not an IPv4 or IPv6 address", "Fix"],
    ),
    (
        "a worker list that is not a list",
        (),
        lambda hv: {"celery_workers": {"name": "high", "queues": ["high_priority"]}},
        ["celery_workers", "Fix"],
    ),
    (
        "a misspelt role variable",
        (),
        lambda hv: {"celery_worker_memory_overcomit": 1.5},
        ["celery_worker_memory_overcomit is no variable of celery_worker (a misspelling?)", "Fix"],
    ),
    (
        "root as the fleet's user",
        (),
        lambda hv: {"celery_app_user": "root"},
        ['celery_app_user "root"', "other than root", "Fix"],
    ),
    (
        "a relative config directory",
        (),
        lambda hv: {"celery_fleet_config_dir": "etc/celery-fleet"},
        ['celery_fleet_config_dir "etc/celery-fleet"', "absolute paths", "Fix"],
    ),
    (
        "a throttle without a limit",
        (),
        lambda hv: {"celery_workers": workers(hv, processing={"memory_high": "1G"})},
        ["celery_workers[processing].memory_high 1G is set without memory_max", "Fix"],
    ),
    (
        "concurrency in words",
        (),
        lambda hv: {"celery_workers": workers(hv, high={"concurrency": "two"})},
        ["celery_workers", "concurrency", "Fix"],
    ),
    (
        "GPU sharing said in words",
        (),
        lambda hv: {"celery_workers": workers(hv, gpu={"gpus": [0], "gpu_sharing": "sometimes"})},
        ["gpu_sharing", "Fix"],
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


def failure_messages(run) -> list[str]:
    """The messages of the failed tasks of a run with the json callback, or [] when it printed no JSON."""
    try:
        report = json.loads(run.stdout)
    except ValueError:
        return []
    return [
        str(result.get("msg", ""))
        for play in report.get("plays", [])
        for task in play.get("tasks", [])
        for result in task.get("hosts", {}).values()
        if result.get("failed") and not result.get("skipped")
    ]


def refusal_problems(name: str, run, fragments: list[str]) -> list[str]:
    """What is wrong with how site.yml refused one case: [] when it was refused as it should be."""
    output = run.stdout + run.stderr
    if run.returncode == 0:
        return [f"{name}: site.yml accepted it"]
    if "Traceback" in output:
        return [f"{name}: a traceback\n{output[-3000:]}"]
    messages = failure_messages(run)
    if not messages:
        return [f"{name}: no failed task\n{output[-3000:]}"]
    # The refusal itself starts with the host, or with the fleet for a fleet-wide problem.
    problems = [
        f"{name}: {message[:300]!r} starts with neither '{HOST}: ' nor 'fleet: '"
        for message in messages
        if not message.startswith((f"{HOST}: ", "fleet: "))
    ]
    text = " ".join(messages)
    problems += [
        f"{name}: {fragment!r} missing from {text[:1500]!r}" for fragment in fragments if fragment not in text
    ]
    return problems


def run_cases(hostvars, tmp_path, cases: list[tuple[str, dict]]) -> dict[str, subprocess.CompletedProcess]:
    """site.yml on each case's inventory, a few at a time: each only reads the host until it is refused."""

    def one(case: tuple[str, dict]) -> tuple[str, subprocess.CompletedProcess]:
        name, hosts = case
        path = tmp_path / re.sub(r"\W+", "-", name) / "hosts.yml"
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(hosts))
        return name, playbook("site.yml", path, json_output=True)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return dict(pool.map(one, cases))


@pytest.fixture(scope="module")
def catalogue(host, hostvars, tmp_path_factory):
    """Every case run once against the converged host, with a snapshot of the host before and after."""
    before = snapshot(host)
    cases = [
        (name, inventory(hostvars, variables(hostvars), without)) for name, without, variables, _ in CASES
    ]
    # Two inventory hosts reaching the same machine: two cloned VMs that kept their template's hostname.
    twin = inventory(hostvars)
    twin["all"]["children"]["celery_workers"]["hosts"][TWIN] = {"ansible_host": HOST}
    runs = run_cases(hostvars, tmp_path_factory.mktemp("catalogue"), [*cases, ("shared hostname", twin)])
    return {"runs": runs, "changed": snapshot(host) != before}


def test_the_catalogue_covers_every_class_of_the_plan(catalogue):
    assert len(catalogue["runs"]) >= 50


def test_no_case_changed_the_host(catalogue):
    # Cases run concurrently, so one snapshot around all of them: a case that changed anything fails here.
    assert not catalogue["changed"], "the host changed while the catalogue ran"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_site_refuses_an_invalid_inventory(catalogue, case):
    name, _, _, fragments = case
    assert refusal_problems(name, catalogue["runs"][name], fragments) == []


def test_site_refuses_two_worker_hosts_with_one_hostname(catalogue):
    fragments = [f"fleet: worker hosts {HOST}, {TWIN} share the hostname", "Fix"]
    assert refusal_problems("shared hostname", catalogue["runs"]["shared hostname"], fragments) == []


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ("low", f"{HOST}: no slot of celery-worker@low.* is active (celery-worker@low."),
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
    unit = unit if unit.startswith("celery-beat") else worker_unit(host, unit)
    host.run(f"systemctl stop {unit}")
    try:
        run = playbook("playbooks/verify.yml", tmp_path / "hosts.yml")
    finally:
        host.run(f"systemctl start {unit}")
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert message in output, output[-3000:]
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        # The seed's classic: `celery worker` started by hand without -Q, consuming only `celery`.
        ("", ["fleet: {node} consumes celery; no celery_workers entry on any host runs it"]),
        # A worker that embeds a beat, in a spelling of -B: verify finds it on the host, outside any unit.
        (
            "-EB",
            ["{host}: the worker with pid {pid} (", "runs an embedded beat, turned on by its command line"],
        ),
    ],
    ids=["stray", "embedded-beat"],
)
def test_verify_catches_a_worker_started_by_hand(host, hostvars, tmp_path, flags, fragments):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(hostvars)))
    node = f"by-hand@{host.check_output('hostname')}"
    unit = "celery-fleet-test-by-hand"
    argv = f"{VENV}/bin/celery --app demo_app worker --hostname={node} --queues=celery --pool=solo {flags}"
    started = host.run(
        f"systemd-run --unit={unit} --working-directory=/tmp "
        f"--property=EnvironmentFile={PATHS['app_env']} "
        f"--property=EnvironmentFile={PATHS['broker_env']} {argv}"
    )
    assert started.rc == 0, started.stderr
    try:
        for _ in range(30):
            if node in fleet_json(host, f"{STATUS} --fleet")["nodes"]:
                break
            time.sleep(2)
        else:
            pytest.fail(f"{node} never answered:\n{journal(host, unit)}")
        pid = host.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
        run = playbook("playbooks/verify.yml", tmp_path / "hosts.yml")
    finally:
        host.run(f"systemctl stop {unit}")
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    for fragment in fragments:
        assert fragment.format(node=node, host=HOST, pid=pid) in " ".join(output.split()), output[-3000:]
    assert "Traceback" not in output
