#!/usr/bin/python
"""List a host's installed app releases, and prune those beyond the newest N that no process runs from."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: releases
short_description: The app releases installed on a host, which processes run from them, and pruning
description:
  - A release is a virtualenv under O(releases_dir), named by its wheelhouse digest and complete once
    its C(.celery-fleet-installed) marker exists. Its C(.celery-fleet-served) marker is touched (O(served))
    each time a deploy or rollback of it passed verify. Releases are ordered by when they last served,
    then those that never did by install time, newest first; the first served one other than the
    current is what C(playbooks/rollback.yml) returns to, never a release that failed.
  - With O(keep), removes every release beyond the newest O(keep) (counting O(current)) and every
    incomplete one, except a release that a running process starts from (its path is in the process's
    command line, as every fleet unit starts from its release directory). Wheelhouses other than
    O(current)'s go too - a release's virtualenv is all a rollback needs.
options:
  releases_dir:
    description: Where the release virtualenvs live.
    type: path
    required: true
  wheelhouse_dir:
    description: Where unpacked wheelhouses live, one directory per digest; pruned with the releases.
    type: path
  current:
    description: The digest of the release the C(venv) link points at; never removed.
    type: str
  keep:
    description: How many complete releases to keep, O(current) included; 0 lists and removes nothing.
    type: int
    default: 0
  served:
    description: Record that this release serves the fleet now, unless it already is the last that served.
    type: str
  proc:
    description: The proc file system to read command lines from.
    type: path
    default: /proc
"""

RETURN = r"""
releases:
  description: >-
    Every complete release left, in that order - C(name), C(installed), C(served) (when it last served,
    or null; UTC, ISO 8601) and C(in_use).
  type: list
  elements: dict
removed:
  description: Paths removed.
  type: list
  elements: str
"""

MARKER = ".celery-fleet-installed"
SERVED = ".celery-fleet-served"


def in_use(releases_dir: Path, proc: Path) -> set[str]:
    """Release names that some running process's command line starts from."""
    prefix = str(releases_dir).rstrip("/") + "/"
    used: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended, or is not ours to read
            continue
        for word in words:
            text = word.decode(errors="replace")
            if text.startswith(prefix):
                used.add(text[len(prefix) :].partition("/")[0])
    return used


def survey(releases_dir: Path, proc: Path) -> list[dict[str, Any]]:
    """Every release directory, newest first, with whether it is complete and in use."""
    used = in_use(releases_dir, proc)
    found = []
    for path in releases_dir.iterdir() if releases_dir.is_dir() else []:
        if not path.is_dir() or path.is_symlink():
            continue
        marker, served = path / MARKER, path / SERVED
        found.append(
            {
                "name": path.name,
                "path": path,
                "mtime": marker.stat().st_mtime if marker.exists() else None,
                "served": served.stat().st_mtime if served.exists() else None,
                "in_use": path.name in used,
            }
        )
    return sorted(
        found,
        key=lambda r: (r["mtime"] is not None, r["served"] is not None, r["served"] or 0, r["mtime"] or 0),
        reverse=True,
    )


def iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def prune(found: list[dict[str, Any]], current: str | None, keep: int) -> list[dict[str, Any]]:
    """The releases to remove: incomplete ones and those past the newest ``keep``, unless in use."""
    complete = [r for r in found if r["mtime"] is not None]
    kept = {current, *[r["name"] for r in complete if r["name"] != current][: max(0, keep - 1)]}
    return [r for r in found if r["name"] not in kept and not r["in_use"]]


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "releases_dir": {"type": "path", "required": True},
            "wheelhouse_dir": {"type": "path"},
            "current": {"type": "str"},
            "keep": {"type": "int", "default": 0},
            "proc": {"type": "path", "default": "/proc"},
            "served": {"type": "str"},
        },
        supports_check_mode=True,
    )
    params = module.params
    releases_dir, current, keep = Path(params["releases_dir"]), params["current"], params["keep"]
    if keep < 0:
        module.fail_json(msg=f"releases: keep={keep} must be 0 (list only) or more")
    found = survey(releases_dir, Path(params["proc"]))
    served = params["served"]
    last = next((r for r in found if r["served"] is not None), None)
    marked = bool(served) and (last is None or last["name"] != served)
    if marked:
        target = releases_dir / served / SERVED
        if not (releases_dir / served / MARKER).exists():
            module.fail_json(msg=f"releases: {served} is not an installed release under {releases_dir}")
        if not module.check_mode:
            target.touch()
        found = survey(releases_dir, Path(params["proc"]))
    doomed = prune(found, current, keep) if keep else []
    paths = [r["path"] for r in doomed]
    if keep and params["wheelhouse_dir"] and Path(params["wheelhouse_dir"]).is_dir():
        wheelhouses = Path(params["wheelhouse_dir"]).iterdir()
        paths += sorted(p for p in wheelhouses if p.is_dir() and p.name != current)
    if paths and not module.check_mode:
        for path in paths:
            shutil.rmtree(path)
    left = [r for r in found if r not in doomed and r["mtime"] is not None]
    module.exit_json(
        changed=bool(paths) or marked,
        removed=[str(p) for p in paths],
        releases=[
            {
                "name": r["name"],
                "installed": iso(r["mtime"]),
                "served": iso(r["served"]),
                "in_use": r["in_use"],
            }
            for r in left
        ],
    )


if __name__ == "__main__":
    main()
