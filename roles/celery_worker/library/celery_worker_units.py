#!/usr/bin/python
"""Write every worker instance's files of a host in one step, and remove those of instances that are gone."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: celery_worker_units
short_description: Reconcile the per-instance files of templated worker units
description:
  - For each instance, writes its environment file, its systemd drop-in and the C(<target>.wants) link
    that enables it, only where they differ.
  - Removes the environment files, drop-in directories and wants links of instances that are not listed.
  - One call for the whole host, so a no-op run costs the same for 1 or 100 units.
  - Does not talk to systemd; reload and restart are the caller's job, from C(changed_instances).
options:
  instances:
    description: Instance name to its rendered C(env) and C(dropin) contents.
    type: dict
    required: true
  unit:
    description: Template unit name without C(@.service).
    type: str
    default: celery-worker
  target:
    description: The unit the instances are wanted by.
    type: str
    default: celery.target
  unit_dir:
    description: Where units, drop-ins and wants directories live.
    type: path
    default: /etc/systemd/system
  env_dir:
    description: Where instance environment files live.
    type: path
    required: true
  dropin_name:
    description: File name of the per-instance drop-in.
    type: str
    default: 20-instance.conf
"""

RETURN = r"""
changed_instances:
  description: Instances whose environment, drop-in or wants link was written.
  type: list
  elements: str
removed_instances:
  description: Instances whose files were removed.
  type: list
  elements: str
"""

EXAMPLES = r"""
- name: Write every worker instance's files
  celery_worker_units:
    env_dir: /etc/celery-fleet/workers
    instances:
      high:
        env: "CELERY_WORKER_ARGS=\"--queues=high\"\n"
        dropin: "[Service]\nTimeoutStopSec=630\n"
"""


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


def plan(params: dict[str, Any]) -> dict[str, Any]:
    """What to write and remove: ``writes`` (path, content, mode), ``links``, ``removals``, per instance."""
    unit_dir, env_dir = Path(params["unit_dir"]), Path(params["env_dir"])
    unit, wants = params["unit"], Path(params["unit_dir"]) / f"{params['target']}.wants"
    template = unit_dir / f"{unit}@.service"
    writes, links, removals = [], [], []
    changed: set[str] = set()
    for name, files in sorted(params["instances"].items()):
        for path, content, mode in (
            (env_dir / f"{name}.env", files["env"], 0o600),
            (unit_dir / f"{unit}@{name}.service.d" / params["dropin_name"], files["dropin"], 0o644),
        ):
            if _read(path) != content or (path.stat().st_mode & 0o7777) != mode:
                writes.append((path, content, mode, _read(path)))
                changed.add(name)
        link = wants / f"{unit}@{name}.service"
        if not link.is_symlink() or os.readlink(link) != str(template):
            links.append((link, template))
            changed.add(name)
    keep = set(params["instances"])
    found = [
        *((p, p.name[: -len(".env")]) for p in env_dir.glob("*.env")),
        *((p, p.name[len(unit) + 1 : -len(".service.d")]) for p in unit_dir.glob(f"{unit}@?*.service.d")),
        *((p, p.name[len(unit) + 1 : -len(".service")]) for p in wants.glob(f"{unit}@?*.service")),
    ]
    removals = sorted((p, name) for p, name in found if name not in keep)
    return {
        "writes": writes,
        "links": links,
        "removals": removals,
        "changed_instances": sorted(changed),
        "removed_instances": sorted({name for _, name in removals}),
    }


def apply(todo: dict[str, Any]) -> None:
    for path, content, mode, _ in todo["writes"]:
        _write(path, content, mode)
    for link, target in todo["links"]:
        link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
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
        },
        supports_check_mode=True,
    )
    for name, files in module.params["instances"].items():
        if not isinstance(files, dict) or not {"env", "dropin"} <= set(files):
            module.fail_json(msg=f"instances[{name}] needs env and dropin contents")
    todo = plan(module.params)
    changed = bool(todo["writes"] or todo["links"] or todo["removals"])
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
        changed_instances=todo["changed_instances"],
        removed_instances=todo["removed_instances"],
        diff=diff,
    )


if __name__ == "__main__":
    main()
