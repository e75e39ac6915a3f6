"""Each example inventory passes preflight's fleet checks against the demo app routed like its seed.

The app's routing is read the way preflight reads it: by importing the app from a real wheelhouse, with the
example's own celery_app_env. Host facts (RAM, CPUs, GPUs) are the real hosts'; the examples' hosts are
documentation addresses, so the GPU and CPU checks against a host are covered by the Molecule scenarios.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, build_wheelhouse, inventory_list, load_plugin

report_module = load_plugin("playbooks/library/celery_app_report.py")
checks = load_plugin("playbooks/filter_plugins/fleet_checks.py")
workers_plugin = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/defaults/main.yml").read_text())[
    "celery_worker_defaults"
]
EXAMPLES = sorted(p.parent for p in (ROOT / "inventories" / "examples").rglob("hosts.yml"))


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
        entries = hostvars[host]["celery_workers"]
        assert workers_plugin.celery_worker_errors(entries, DEFAULTS) == [], host
        instances = workers_plugin.celery_worker_instances(entries, DEFAULTS, {"cpus": 8})
        fleet += [{**i, "host": host} for i in instances]
    first = hostvars[worker_hosts[0]]
    env = first.get("celery_app_env", {})
    assert env.get("DEMO_PROFILE"), "the example names the demo app's profile for its seed"
    report, _ = report_module.app_report(
        wheelhouse, first.get("celery_app_module", "demo_app"), env, sys.executable, cache_dir=tmp_path
    )
    coverage = checks.celery_queue_coverage(report, fleet)
    doctor = checks.celery_config_doctor(report, fleet)
    assert coverage["errors"] == [], coverage
    assert doctor["errors"] == [], doctor
    # Every routed queue is consumed; the seed's queues are all there.
    consumed = {q for w in fleet for q in w["queues"]}
    assert set(report["routed_queues"]) <= consumed
    for host in worker_hosts:
        mine = [w for w in fleet if w["host"] == host]
        assert mine, f"{host} runs no worker"
