#!/usr/bin/python
"""Build, on the controller, one wheelhouse archive for the targets' Python."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: celery_wheelhouse
short_description: Build a wheelhouse archive for the targets' Python and platform
description:
  - Runs on the controller. Builds a wheel from each local project in O(sources), then
    downloads every dependency as a binary wheel for the TARGET's Python version and
    platform (not the controller's), and packs the lot, with a requirements file that pins
    each wheel, into one C(.tar.gz).
  - The archive name carries a digest of every input, so an unchanged app, requirement list
    and target reuse the cached archive and report C(changed=false).
  - A source is a project directory with C(pyproject.toml) and a C(src/) layout; the digest
    covers C(pyproject.toml) and C(src/).
options:
  sources:
    description: Local project directories to build into wheels.
    type: list
    elements: path
    required: true
  requirements:
    description: Further requirement specifiers to include, such as C(flower==2.2.0).
    type: list
    elements: str
    default: []
  python_version:
    description: The targets' Python version, C(major.minor).
    type: str
    required: true
  platforms:
    description: pip platform tags the targets accept.
    type: list
    elements: str
    required: true
  machine:
    description: The targets' machine architecture, as in C(platform_machine) markers (C(x86_64)).
    type: str
    required: true
  dest:
    description: Directory on the controller that caches archives.
    type: path
    required: true
"""

EXAMPLES = r"""
- name: Build the wheelhouse
  celery_wheelhouse:
    sources: [/src/myapp]
    requirements: [flower==2.2.0]
    python_version: "3.11"
    platforms: [manylinux2014_x86_64]
    machine: x86_64
    dest: /var/cache/wheelhouse
"""

RETURN = r"""
archive:
  description: Path of the archive on the controller.
  type: str
  returned: always
digest:
  description: Digest of the inputs; also the top-level directory in the archive.
  type: str
  returned: always
wheels:
  description: File names of the wheels in the archive.
  type: list
  returned: always
"""

SKIP_DIRS = {"__pycache__", "build", "dist"}
WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def source_files(source: Path) -> list[Path]:
    """The files of a project that decide its wheel."""
    files = [source / "pyproject.toml"]
    for root, dirs, names in os.walk(source / "src"):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        files.extend(Path(root) / n for n in sorted(names) if not n.endswith((".pyc", ".pyo")))
    return files


def digest_inputs(
    sources: list[Path], requirements: list[str], python_version: str, platforms: list[str]
) -> str:
    """One digest over everything that decides the wheelhouse's contents."""
    h = hashlib.sha256()
    for value in (python_version, *platforms, *requirements):
        h.update(value.encode() + b"\0")
    for source in sources:
        for path in source_files(source):
            h.update(str(path.relative_to(source)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def pins(wheel_names: list[str]) -> list[str]:
    """``name==version`` for every wheel, so the targets install exactly these."""
    lines = []
    for name in wheel_names:
        match = WHEEL_NAME.match(name)
        if match:
            lines.append(f"{match['name'].replace('_', '-').lower()}=={match['version']}")
    return sorted(lines)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(python_version: str, machine: str) -> dict[str, str]:
    """PEP 508 marker values of the targets, not of the controller."""
    major_minor = ".".join(python_version.split(".")[:2])
    return {
        "implementation_name": "cpython",
        "implementation_version": python_version,
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "python_full_version": python_version,
        "python_version": major_minor,
        "sys_platform": "linux",
    }


def wheel_requires(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        headers = HeaderParser().parsestr(wheel.read(meta).decode("utf-8"))
    return headers.get_all("Requires-Dist") or []


def missing_requirements(house: Path, top_level: list[str], environment: dict[str, str]) -> list[str]:
    """Requirements the targets need that the wheelhouse lacks.

    pip download evaluates dependency markers with the controller's Python, so a
    dependency such as ``async-timeout; python_full_version < "3.11.3"`` is left
    out when the controller runs 3.11.7 and the targets 3.11.2. Walk the graph
    with the targets' marker values instead.
    """
    from packaging.requirements import Requirement  # noqa: PLC0415 -- controller-only dependency

    wheels = {}
    for path in house.glob("*.whl"):
        match = WHEEL_NAME.match(path.name)
        if match:
            wheels[canonical(match["name"])] = path
    missing: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in top_level]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name not in wheels:
            missing.setdefault(name, str(req).split(";")[0].strip())
            continue
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for line in wheel_requires(wheels[name]):
                dep = Requirement(line)
                if dep.marker is None or dep.marker.evaluate({**environment, "extra": extra}):
                    todo.append(dep)
    return sorted(missing.values())


def pip_args(python_version: str, platforms: list[str]) -> list[str]:
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def build(module: AnsibleModule, sources: list[Path], work: Path, digest: str) -> list[str]:
    p = module.params
    house = work / digest
    house.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    for source in sources:
        run(module, [*pip, "wheel", "--no-deps", "--wheel-dir", str(house), str(source)])
    local = sorted(house.glob("*.whl"))
    wanted = [str(w) for w in local]
    top_level = [WHEEL_NAME.match(w.name)["name"] for w in local] + p["requirements"]
    environment = target_environment(p["python_version"], p["machine"])
    for _ in range(10):
        run(
            module,
            [
                *pip,
                "download",
                "--dest",
                str(house),
                "--find-links",
                str(house),
                *pip_args(p["python_version"], p["platforms"]),
                *wanted,
                *p["requirements"],
            ],
        )
        wanted = missing_requirements(house, top_level, environment)
        if not wanted:
            break
    else:
        module.fail_json(
            msg=f"could not complete the wheelhouse for the targets: {', '.join(wanted)} missing"
        )
    wheels = sorted(w.name for w in house.glob("*.whl"))
    (house / "requirements.txt").write_text("\n".join(pins(wheels)) + "\n")
    return wheels


def run(module: AnsibleModule, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        module.fail_json(msg=f"{' '.join(cmd[2:5])} failed", cmd=cmd, stdout=proc.stdout, stderr=proc.stderr)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "sources": {"type": "list", "elements": "path", "required": True},
            "requirements": {"type": "list", "elements": "str", "default": []},
            "python_version": {"type": "str", "required": True},
            "platforms": {"type": "list", "elements": "str", "required": True},
            "machine": {"type": "str", "required": True},
            "dest": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    sources = [Path(s).resolve() for s in p["sources"]]
    for source in sources:
        if not (source / "pyproject.toml").is_file():
            module.fail_json(
                msg=f"{source} has no pyproject.toml; celery_app_sources must list project directories"
            )
    digest = digest_inputs(sources, p["requirements"], p["python_version"], [p["machine"], *p["platforms"]])
    dest = Path(p["dest"])
    archive = dest / f"wheelhouse-{digest}.tar.gz"
    if archive.is_file():
        with tarfile.open(archive) as tar:
            wheels = sorted(Path(n).name for n in tar.getnames() if n.endswith(".whl"))
        module.exit_json(changed=False, archive=str(archive), digest=digest, wheels=wheels)
    if module.check_mode:
        module.exit_json(changed=True, archive=str(archive), digest=digest, wheels=[])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheels = build(module, sources, Path(tmp), digest)
        partial = Path(tmp) / archive.name
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(Path(tmp) / digest, arcname=digest)
        partial.rename(archive)
    module.exit_json(changed=True, archive=str(archive), digest=digest, wheels=wheels)


if __name__ == "__main__":
    main()
