#!/usr/bin/python
"""Write every worker instance's files of a host in one step, and remove those of instances that are gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: celery_worker_units
short_description: Reconcile the two slots of every templated worker unit, and plan its rollout
description:
  - Every worker instance has two slots, the units C(<unit>@<instance>.a) and C(<unit>@<instance>.b). The
    enabled slot is the live one. A change (new settings, a new release) is written to the slot that is
    not running, which is enabled in place of the live one; the caller starts it and, once it consumes,
    retires the old slot, which finishes its running tasks on its own release and exits. So a queue is
    never without a consumer during a rollout.
  - Where an instance may not overlap (C(handoff=in_place), the memory budget has no room) or its other
    slot still drains an earlier rollout, the live slot's files are rewritten in place and it restarts.
  - Removes the files and links of slots that neither serve nor run, and of instances that are gone.
  - One call for the whole host, so a no-op run costs the same for 1 or 100 units.
  - Reads unit states from systemd, but starts and stops nothing; C(actions) say what the caller does.
options:
  instances:
    description:
      - Instance name to its rendered C(env) and C(dropin) contents and its C(handoff).
      - C(handoff) is C(overlap) (the default) or C(in_place), where the memory budget has no room.
    type: dict
    required: true
  unit:
    description: Template unit name without C(@.service).
    type: str
    default: celery-worker
  target:
    description: The unit the live slots are wanted by.
    type: str
    default: celery.target
  unit_dir:
    description: Where units, drop-ins and wants directories live.
    type: path
    default: /etc/systemd/system
  env_dir:
    description: Where slot environment files live.
    type: path
    required: true
  dropin_name:
    description: File name of the per-slot drop-in.
    type: str
    default: 20-instance.conf
  drained:
    description:
      - The host is drained (C(playbooks/drain.yml)) - each instance's live slot gets its new files,
        but no slot is enabled and no action starts one.
    type: bool
    default: false
"""

RETURN = r"""
actions:
  description: >-
    What the rollout does, per instance that needs it - C(instance), C(unit) (the slot to run, e.g.
    C(high-1.b)), C(old) (the slot it replaces, or null) and C(mode) - C(handoff) (start C(unit), then
    retire C(old)), C(restart) (restart C(unit) in place) or C(start) (start C(unit), nothing to replace).
  type: list
  elements: dict
changed_instances:
  description: Instances whose files or enablement were written.
  type: list
  elements: str
removed_units:
  description: Slots (instance.slot) no longer in the inventory that still run; the caller stops them.
  type: list
  elements: str
leftovers:
  description: The files of C(removed_units), kept so they stop with their limits; the caller removes them.
  type: list
  elements: str
deferred:
  description: Instances whose other slot still drains an earlier rollout; they keep their settings this run.
  type: list
  elements: str
retire:
  description: Slots that serve but are not live (an interrupted rollout); the caller drains them.
  type: list
  elements: str
"""

EXAMPLES = r"""
- name: Write every worker slot's files
  celery_worker_units:
    env_dir: /etc/celery-fleet/workers
    instances:
      high:
        env: "OMP_NUM_THREADS=\"1\"\n"
        dropin: "[Service]\nTimeoutStopSec=630\n"
        handoff: overlap
"""

SLOTS = ("a", "b")
# States in which a slot's process exists (serving, starting or draining).
BUSY = frozenset({"active", "activating", "reloading", "deactivating", "refreshing"})
SERVING = BUSY - {"deactivating"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write(path: Path, content: str, mode: int) -> None:
    """Atomically replace ``path``; readers never see a half-written file."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def unit_states(unit: str) -> dict[str, str]:
    """ActiveState of every loaded slot of ``unit``, keyed by instance.slot."""
    out = subprocess.run(
        ["systemctl", "list-units", "--all", "--plain", "--no-legend", "--no-pager", f"{unit}@*.service"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    states = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].startswith(f"{unit}@"):
            states[fields[0][len(unit) + 1 : -len(".service")]] = fields[2]
    return states


class Layout:
    """Where one slot's files live."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.unit = params["unit"]
        self.unit_dir, self.env_dir = Path(params["unit_dir"]), Path(params["env_dir"])
        self.wants = self.unit_dir / f"{params['target']}.wants"
        self.template = self.unit_dir / f"{self.unit}@.service"
        self.dropin_name = params["dropin_name"]

    def files(self, slot: str) -> list[tuple[Path, int]]:
        return [
            (self.env_dir / f"{slot}.env", 0o600),
            (self.unit_dir / f"{self.unit}@{slot}.service.d" / self.dropin_name, 0o644),
        ]

    def link(self, slot: str) -> Path:
        return self.wants / f"{self.unit}@{slot}.service"

    def enabled(self, slot: str) -> bool:
        link = self.link(slot)
        return link.is_symlink() and os.readlink(link) == str(self.template)

    def written(self, slot: str, env: str, dropin: str) -> bool:
        return all(
            _read(path) == content and (path.stat().st_mode & 0o7777) == mode
            for (path, mode), content in zip(self.files(slot), (env, dropin), strict=True)
        )

    def found(self) -> list[tuple[Path, str]]:
        """Every slot file, drop-in directory and wants link on disk, with its slot name."""
        at = len(self.unit) + 1
        return [
            *((p, p.name[: -len(".env")]) for p in self.env_dir.glob("*.env")),
            *((p, p.name[at : -len(".service.d")]) for p in self.unit_dir.glob(f"{self.unit}@?*.service.d")),
            *((p, p.name[at : -len(".service")]) for p in self.wants.glob(f"{self.unit}@?*.service")),
        ]


def decide(
    lay: Layout, name: str, files: dict[str, Any], states: dict[str, str], drained: bool
) -> tuple[str, dict[str, Any] | None, bool]:
    """One instance's slot to serve from, what the caller does with it, and whether it waits this run."""
    slots = [f"{name}.{s}" for s in SLOTS]
    serving = [s for s in slots if states.get(s) in SERVING]
    enabled = [s for s in slots if lay.enabled(s)]
    # The live slot: the serving one (the enabled one, if both serve), else the enabled one, else the
    # first. A run that died after enabling a new slot but before starting it still has the old one live.
    live = ([s for s in serving if s in enabled] or serving or enabled or slots)[0]
    spare = slots[1 - slots.index(live)]
    if drained:
        # playbooks/drain.yml stopped the host: settings still land, nothing starts or is enabled.
        return live, None, False
    if lay.written(live, files["env"], files["dropin"]):
        return live, None if live in serving else {"mode": "start", "old": None}, False
    if live not in serving:
        return live, {"mode": "start", "old": None}, False
    if states.get(spare) in BUSY:
        # The other slot still drains an earlier rollout: the live one serves on, unchanged, until a
        # later run can hand over without a gap.
        return live, None, True
    if files.get("handoff", "overlap") == "overlap":
        return spare, {"mode": "handoff", "old": live}, False
    # No room in the memory budget to overlap: a restart in place, one unit at a time.
    return live, {"mode": "restart", "old": None}, False


def plan(params: dict[str, Any], states: dict[str, str]) -> dict[str, Any]:
    """What to write, link, unlink and remove, and the rollout ``actions``, from the files and ``states``."""
    lay = Layout(params)
    writes: list[tuple[Path, str, int, str | None]] = []
    links: list[Path] = []
    unlinks: list[Path] = []
    actions: list[dict[str, Any]] = []
    changed: set[str] = set()
    keep: set[str] = set()
    retire: list[str] = []
    deferred: list[str] = []
    drained = params["drained"]
    for name, files in sorted(params["instances"].items()):
        slots = [f"{name}.{s}" for s in SLOTS]
        target, action, wait = decide(lay, name, files, states, drained)
        if wait:
            deferred.append(name)
            keep.update(slots)
            continue
        if not lay.written(target, files["env"], files["dropin"]):
            writes += [
                (path, content, mode, _read(path))
                for (path, mode), content in zip(
                    lay.files(target), (files["env"], files["dropin"]), strict=True
                )
            ]
            changed.add(name)
        for slot in slots:
            if slot == target and not drained and not lay.enabled(slot):
                links.append(lay.link(slot))
                changed.add(name)
            elif (slot != target or drained) and lay.enabled(slot):
                unlinks.append(lay.link(slot))
                changed.add(name)
        if action:
            actions.append({"instance": name, "unit": target, **action})
        # A serving slot that is not the live one (an interrupted rollout) drains too.
        old = action["old"] if action else None
        retire += [s for s in slots if states.get(s) in SERVING and s not in (target, old) and not drained]
        # A slot that still runs keeps its files until it has stopped: systemd reads them while it drains.
        keep.update(s for s in slots if s == target or states.get(s) in BUSY)
    gone = [(p, slot) for p, slot in lay.found() if slot not in keep and p not in unlinks]
    removals = [(p, slot) for p, slot in sorted(gone) if states.get(slot) not in BUSY]
    # A unit that still runs (gone from the inventory, or a unit from before slots) is disabled now but
    # keeps its drop-in and environment until it has stopped: its TimeoutStopSec and limits come from them.
    running = [p for p, slot in sorted(gone) if states.get(slot) in BUSY]
    unlinks += [p for p in running if p.parent == lay.wants]
    return {
        "writes": writes,
        "links": [(link, lay.template) for link in links],
        "unlinks": unlinks,
        "removals": removals,
        "actions": actions,
        "changed_instances": sorted(changed),
        "removed_units": sorted({slot for _, slot in gone if states.get(slot) in BUSY}),
        "leftovers": [str(p) for p in running if p.parent != lay.wants],
        "retire": retire,
        "deferred": deferred,
    }


def apply(todo: dict[str, Any]) -> None:
    for path, content, mode, _ in todo["writes"]:
        _write(path, content, mode)
    for link, target in todo["links"]:
        link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    for link in todo["unlinks"]:
        link.unlink()
    for path, _ in todo["removals"]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "instances": {"type": "dict", "required": True},
            "unit": {"type": "str", "default": "celery-worker"},
            "target": {"type": "str", "default": "celery.target"},
            "unit_dir": {"type": "path", "default": "/etc/systemd/system"},
            "env_dir": {"type": "path", "required": True},
            "dropin_name": {"type": "str", "default": "20-instance.conf"},
            "drained": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    for name, files in module.params["instances"].items():
        if not isinstance(files, dict) or not {"env", "dropin"} <= set(files):
            module.fail_json(msg=f"instances[{name}] needs env and dropin contents")
    try:
        states = unit_states(module.params["unit"])
    except (OSError, subprocess.CalledProcessError) as exc:
        module.fail_json(msg=f"celery_worker_units: cannot read the unit states from systemctl: {exc}")
    todo = plan(module.params, states)
    changed = bool(todo["writes"] or todo["links"] or todo["unlinks"] or todo["removals"])
    diff = [
        {"before_header": str(p), "after_header": str(p), "before": before or "", "after": content}
        for p, content, _, before in todo["writes"]
    ] + [
        {"before_header": str(p), "after_header": "(removed)", "before": str(p), "after": ""}
        for p, _ in todo["removals"]
    ]
    if changed and not module.check_mode:
        apply(todo)
    module.exit_json(
        changed=changed,
        actions=todo["actions"],
        changed_instances=todo["changed_instances"],
        removed_units=todo["removed_units"],
        leftovers=todo["leftovers"],
        retire=todo["retire"],
        deferred=todo["deferred"],
        diff=diff,
    )


if __name__ == "__main__":
    main()
