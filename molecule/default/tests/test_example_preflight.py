"""Each example inventory, as it is, passes the real preflight playbook and leaves the host unchanged.

The examples' hosts are documentation addresses (192.0.2.0/24). Here an overlay inventory points every one
of them at this scenario's container, which has four fake GPUs, and the broker's private address is the
container's own; nothing else is changed. The worker entries are thus checked against a real host's CPUs,
RAM (mistudio/full needs 20 GiB for its GPU units: this machine has 24) and GPU device nodes. Preflight
builds the wheelhouse, imports the demo app from it with the example's DEMO_PROFILE (its seed's routing),
and checks queue coverage and the app's settings against the example's workers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleet_testing import ROOT, playbook, snapshot

HOST = "celery-fleet-default"
EXAMPLES = sorted(p.parent for p in (ROOT / "inventories" / "examples").rglob("hosts.yml"))


def inventory_hosts(inventory: Path) -> list[str]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(inventory), "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return sorted(json.loads(out.stdout)["_meta"]["hostvars"])


def test_every_seed_example_is_checked():
    names = {p.relative_to(ROOT / "inventories" / "examples").as_posix() for p in EXAMPLES}
    assert names == {"priority-tiers", "mistudio/minimal", "mistudio/full", "semantik"}


@pytest.mark.parametrize(
    "example", EXAMPLES, ids=lambda p: p.relative_to(ROOT / "inventories" / "examples").as_posix()
)
def test_the_example_passes_preflight_and_changes_nothing(host, example, tmp_path):
    hosts = inventory_hosts(example)
    reach = {"ansible_host": HOST, "ansible_connection": "community.docker.docker"}
    overlay = tmp_path / "reach.yml"
    overlay.write_text(yaml.safe_dump({"all": {"hosts": dict.fromkeys(hosts, reach)}}))
    before = snapshot(host)
    # The broker's private address is a documentation one too: here it is the container's own.
    here = {"redis_private_address": "{{ ansible_facts.default_ipv4.address }}"}
    run = playbook("playbooks/preflight.yml", example, overlay, extra_vars=here)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    # The app was imported from the wheelhouse and its routing checked against the example's workers.
    assert "TASK [Require a worker for every queue the app routes to]" in output, output[-4000:]
    recap = dict(re.findall(r"^(\S+)\s+: (ok=.*)$", output.split("PLAY RECAP")[-1], re.MULTILINE))
    assert set(hosts) <= set(recap), recap
    for name in hosts:
        assert " changed=0 " in recap[name] and " failed=0 " in recap[name], (name, recap[name])
    assert snapshot(host) == before, f"{example.name}: preflight changed the host"
