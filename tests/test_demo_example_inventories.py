"""The example inventories parse, pass the worker plan, and consume exactly their profile's queues."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT, inventory_list, load_plugin
from demo_app.profiles import PROFILES

EXAMPLES = sorted(p.parent.relative_to(ROOT) for p in (ROOT / "inventories" / "examples").rglob("hosts.yml"))
GROUPS = ("celery_broker", "celery_workers", "celery_beat", "celery_flower")
WORKERS = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]
SECRET = re.compile(r"^[A-Za-z0-9._~-]{16,}$")


def plan(inv: dict, host: str) -> dict:
    """The host's worker plan, on a stand-in host with 8 CPUs and the GPUs its entries name."""
    hv = inv["_meta"]["hostvars"][host]
    gpus = {g for e in hv["celery_workers"] for g in e.get("gpus") or [] if isinstance(g, int)}
    facts = {
        "cpus": 8,
        "memtotal_mb": 24000,
        "gpus": [{"index": i, "uuid": f"GPU-{i}", "minor": i} for i in range(max(gpus, default=-1) + 1)],
        "app": hv.get("celery_fleet_app", "demo_app"),
    }
    return WORKERS.celery_worker_plan(hv["celery_workers"], DEFAULTS, facts, hv.get("celery_worker_defaults"))


def test_every_example_is_found():
    assert {p.as_posix() for p in EXAMPLES} == {
        "inventories/examples/priority-tiers",
        "inventories/examples/mistudio/minimal",
        "inventories/examples/mistudio/full",
        "inventories/examples/semantik",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to("inventories/examples").as_posix())
def test_example_inventory(path):
    inv = inventory_list(path)
    hostvars = inv["_meta"]["hostvars"]
    for group in GROUPS:
        assert inv.get(group, {}).get("hosts"), f"{path}: no host in {group}"
    assert len(inv["celery_broker"]["hosts"]) == 1
    assert all(hostvars[h]["ansible_host"].startswith("192.0.2.") for h in hostvars)

    consumed: set[str] = set()
    profiles = set()
    for host in inv["celery_workers"]["hosts"]:
        result = plan(inv, host)
        assert result["errors"] == [], (host, result["errors"])
        consumed.update(q for instance in result["instances"] for q in instance["queues"])
    for host, hv in hostvars.items():
        profiles.add(hv["celery_app_env"]["DEMO_PROFILE"])
        # Secrets come from the vault file, and would pass the roles' own checks.
        assert hv["redis_password"] == "{{ vault_redis_password }}", host
        assert SECRET.match(hv["vault_redis_password"]) and SECRET.match(hv["vault_flower_password"])
    for host in inv["celery_flower"]["hosts"]:
        assert hostvars[host]["flower_password"] == "{{ vault_flower_password }}"
        assert hostvars[host]["flower_user"] not in ("", "admin")
    # The whole fleet runs one profile, and its workers consume every queue the app routes to, and no other.
    [profile] = profiles
    assert consumed == set(PROFILES[profile].queues)
    assert (ROOT / path / "README.md").is_file()
