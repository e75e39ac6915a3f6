"""`site.yml --check --diff` on the converged fleet with one pending worker change: it shows the change,
reports changed only where something would change, exits 0 and leaves the host exactly as it was."""

from __future__ import annotations

import re

import yaml
from fleet_testing import playbook, snapshot
from test_preflight_catalogue import inventory, workers

# Tasks that may report "changed" when one worker entry changes: the module that writes every
# slot's files (whose diff is the change); check mode rolls nothing out.
EXPECTED_CHANGED = {
    "celery_worker : Write every slot's environment file, drop-in and enablement, and plan the rollout",
}


def changed_tasks(output: str) -> set[str]:
    """The tasks that printed a `changed:` result, from the default callback's output."""
    tasks, current = set(), None
    for line in output.splitlines():
        header = re.match(r"^(?:TASK|RUNNING HANDLER) \[(.+?)\] \*+$", line)
        if header:
            current = header.group(1)
        elif line.startswith("changed: [") and current:
            tasks.add(current)
    return tasks


def test_check_mode_shows_a_pending_change_and_changes_nothing(host, hostvars, tmp_path):
    pending = workers(hostvars, low={"concurrency": 3})
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(hostvars, {"celery_workers": pending})))
    before = snapshot(host)
    run = playbook("site.yml", tmp_path / "hosts.yml", check=True)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    # The diff of the one file that would change, and nothing else claiming a change.
    # The change goes to the slot of `low` that is not serving (the rollout's new unit).
    dropin = r"/etc/systemd/system/celery-worker@low\.[ab]\.service\.d/20-instance\.conf"
    assert re.search(dropin, output), output[-4000:]
    assert "+ExecStart=" in output and '"--concurrency=3"' in output, output[-4000:]
    assert changed_tasks(output) <= EXPECTED_CHANGED, changed_tasks(output)
    assert re.search(r"celery-fleet-default\s+:.*changed=[12]\s", output), output[-2000:]
    # Verify says it skipped rather than failing on the fleet that still runs the old setting.
    assert "verify skipped in check mode" in output
    assert snapshot(host) == before, "check mode changed the host"


def test_check_mode_on_the_converged_fleet_reports_nothing_to_change(host, hostvars, tmp_path):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory(hostvars)))
    before = snapshot(host)
    run = playbook("site.yml", tmp_path / "hosts.yml", check=True)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert changed_tasks(output) == set(), changed_tasks(output)
    assert snapshot(host) == before
