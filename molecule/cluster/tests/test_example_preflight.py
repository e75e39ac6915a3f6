"""Each example inventory, as it is, passes the real preflight playbook and leaves every host unchanged.

The examples' hosts are documentation addresses (192.0.2.0/24). Here an overlay inventory points each of them
at its own container of this scenario - a host with GPU entries at the one with four fake GPUs - and the
broker's private address is its container's own; nothing else is changed. The worker entries are thus checked
against real hosts' CPUs, RAM (mistudio/full needs 20 GiB for its GPU units: this machine has 24), GPU device
nodes and hostnames. Preflight builds the wheelhouse, imports the demo app from it with the example's
DEMO_PROFILE (its seed's routing), and checks queue coverage and the app's settings against the example's
workers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleet_testing import ROOT, other, playbook, snapshot

EXAMPLES = sorted(p.parent for p in (ROOT / "inventories" / "examples").rglob("hosts.yml"))
GPU_HOST = "cluster-worker2"
OTHER_HOSTS = ["cluster-worker1", "cluster-broker", "cluster-flower", "cluster-beat1", "cluster-beat2"]

testinfra_hosts = ["ansible://cluster-broker"]


def containers_for(inventory: Path) -> dict[str, str]:
    """Each of the example's hosts, and the container that plays it."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(inventory), "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    hostvars = json.loads(out.stdout)["_meta"]["hostvars"]
    with_gpus = [
        h for h, hv in sorted(hostvars.items()) if any(w.get("gpus") for w in hv.get("celery_workers", []))
    ]
    assert len(with_gpus) <= 1, f"{inventory}: more GPU hosts than this scenario has"
    others = iter(OTHER_HOSTS)
    return {h: GPU_HOST if h in with_gpus else next(others) for h in sorted(hostvars)}


@pytest.mark.parametrize(
    "example", EXAMPLES, ids=lambda p: p.relative_to(ROOT / "inventories" / "examples").as_posix()
)
def test_the_example_passes_preflight_and_changes_nothing(host, example, tmp_path):
    plays = containers_for(example)
    reach = {
        h: {"ansible_host": c, "ansible_connection": "community.docker.docker"} for h, c in plays.items()
    }
    overlay = tmp_path / "reach.yml"
    overlay.write_text(yaml.safe_dump({"all": {"hosts": reach}}))
    machines = [other(host, c) for c in sorted(set(plays.values()))]
    before = [snapshot(m) for m in machines]
    # The broker's private address is a documentation one too: here it is its container's own.
    here = {"redis_private_address": "{{ ansible_facts.default_ipv4.address }}"}
    run = playbook("playbooks/preflight.yml", example, overlay, extra_vars=here)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    # The app was imported from the wheelhouse and its routing checked against the example's workers.
    assert "TASK [Require a worker for every queue the apps route to]" in output, output[-4000:]
    assert "TASK [Require command lines and environments that set nothing the fleet owns]" in output
    recap = dict(re.findall(r"^(\S+)\s+: (ok=.*)$", output.split("PLAY RECAP")[-1], re.MULTILINE))
    for name in plays:
        assert " changed=0 " in recap[name] and " failed=0 " in recap[name], (name, recap.get(name))
    assert [snapshot(m) for m in machines] == before, f"{example.name}: preflight changed a host"
