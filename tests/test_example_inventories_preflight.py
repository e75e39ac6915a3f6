"""Each example inventory passes preflight's fleet checks against the demo app routed like its seed.

Each worker host's entries go through the host's worker plan, and the app's routing and command-line
parsing are read the way preflight reads them: by importing every app of the fleet from a real wheelhouse,
with the example's own celery_app_env, and parsing every extra_args with that wheelhouse's Celery and
Flower. The examples' hosts are documentation addresses, so the host facts here are stand-ins (8 CPUs, the
GPUs the entries name, RAM unknown, so no memory budget); the GPU, CPU and memory checks against a real host
are covered by the Molecule scenarios.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, build_wheelhouse, inventory_list, load_plugin

report_module = load_plugin("playbooks/library/celery_app_report.py")
checks = load_plugin("playbooks/filter_plugins/fleet_checks.py")
workers_plugin = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]
FLEET_APP = yaml.safe_load((ROOT / "roles/celery_fleet/defaults/main.yml").read_text())["celery_fleet_app"]
EXAMPLES = sorted(p.parent for p in (ROOT / "inventories" / "examples").rglob("hosts.yml"))


def plan_host(inv: dict[str, Any], host: str) -> dict[str, Any]:
    """The plan's ``host`` argument as the role builds it (_celery_worker_host), with stand-in facts."""
    hv = inv["_meta"]["hostvars"][host]
    gpus = {g for e in hv["celery_workers"] for g in e.get("gpus") or [] if isinstance(g, int)}
    broker = host in inv["celery_broker"]["hosts"]
    return {
        "cpus": 8,
        # The RAM of the cluster scenario's hosts, which play these hosts for the real preflight.
        "memtotal_mb": 24000,
        "gpus": [{"index": i, "uuid": f"GPU-{i}", "minor": i} for i in range(max(gpus, default=-1) + 1)],
        "gpu_source": "nvidia-smi",
        "app": hv.get("celery_fleet_app", FLEET_APP),
        "broker": broker,
        "broker_maxmemory": hv.get("redis_maxmemory", "") if broker else "",
        "memory_overcommit": hv.get("celery_worker_memory_overcommit", 1.0),
    }


def sources(inv: dict[str, Any], fleet: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What preflight hands Celery's parsers: each entry's extra_args and env, beat's and Flower's args."""
    hostvars = inv["_meta"]["hostvars"]
    out = []
    entries = {(w["host"], w["name"]): w for w in fleet}
    for (host, name), entry in entries.items():
        where = f"{host}: celery_workers[{name}]"
        out.append(
            {
                "command": "worker",
                "args": entry["extra_args"],
                "env": entry["env"],
                "where": f"{where}.extra_args",
                "env_where": f"{where}.env",
            }
        )
    for host in inv["celery_beat"]["hosts"]:
        args = hostvars[host].get("celery_beat_extra_args", [])
        out.append({"command": "beat", "args": args, "env": {}, "where": f"{host}: celery_beat_extra_args"})
    for host in inv["celery_flower"]["hosts"]:
        args = hostvars[host].get("flower_extra_args", [])
        out.append({"command": "flower", "args": args, "env": {}, "where": f"{host}: flower_extra_args"})
    for host, hv in hostvars.items():
        env = hv.get("celery_app_env", {})
        where = f"{host}: celery_app_env"
        out.append({"command": "worker", "args": [], "env": env, "where": where, "env_where": where})
    return out


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo app's wheelhouse for this Python, built or cached by the deploy's own module."""
    sources = [ROOT / "examples" / "demo_app", ROOT]
    return build_wheelhouse(sources, ["flower==2.2.0"], tmp_path_factory.mktemp("wheelhouse"))


def test_every_seed_has_an_example():
    names = {str(p.relative_to(ROOT / "inventories" / "examples")) for p in EXAMPLES}
    assert names == {"priority-tiers", "mistudio/minimal", "mistudio/full", "semantik"}


@pytest.mark.parametrize(
    "example", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "inventories" / "examples"))
)
def test_the_example_passes_preflight(example, wheelhouse, tmp_path):
    inv = inventory_list(example)
    hostvars = inv["_meta"]["hostvars"]
    worker_hosts = inv["celery_workers"]["hosts"]
    fleet = []
    for host in worker_hosts:
        plan = workers_plugin.celery_worker_plan(
            hostvars[host]["celery_workers"],
            DEFAULTS,
            plan_host(inv, host),
            hostvars[host].get("celery_worker_defaults"),
        )
        assert plan["errors"] == [], (host, plan["errors"])
        # On the stand-in 24000 MiB, the GPU host's 4 x 5G units leave no room for a rollout's overlap:
        # preflight says so, and those units restart in place. Any other warning is a defect.
        others = [w for w in plan["warnings"] if "the memory budget has no room to run" not in w]
        assert others == [], (host, others)
        fleet += [{**e, "host": host} for e in plan["entries"]]
    first = hostvars[worker_hosts[0]]
    env = first.get("celery_app_env", {})
    assert env.get("DEMO_PROFILE"), "the example names the demo app's profile for its seed"
    apps = list(dict.fromkeys(w["app"] for w in fleet))
    cli_sources = sources(inv, fleet)
    answer, _ = report_module.fleet_report(
        wheelhouse,
        apps,
        env,
        sys.executable,
        arguments=[{"command": s["command"], "args": s["args"]} for s in cli_sources],
        cache_dir=tmp_path,
    )
    reports = answer["reports"]
    assert set(reports) == set(apps)
    coverage = checks.celery_queue_coverage(reports, fleet)
    doctor = checks.celery_config_doctor(reports, fleet)
    cli = checks.celery_cli_errors(answer["cli"], cli_sources)
    assert coverage["errors"] == [], coverage
    assert doctor["errors"] == [], doctor
    assert cli["errors"] == [], cli
    # Every routed queue is consumed; the seed's queues are all there.
    consumed = {q for w in fleet for q in w["queues"]}
    for report in reports.values():
        assert set(report["routed_queues"]) <= consumed
    for host in worker_hosts:
        mine = [w for w in fleet if w["host"] == host]
        assert mine, f"{host} runs no worker"
