#!/usr/bin/python
"""Import the Celery app from the deploy's own wheelhouse, on the controller, and report its routing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: celery_app_report
short_description: Report a Celery app's queues, routes and reliability settings from a wheelhouse
description:
  - Runs on the controller (C(delegate_to) C(localhost)). Unpacks the wheelhouse archive that
    C(celery_wheelhouse) built into a throwaway directory, installs it with C(pip --no-index)
    into a fresh virtualenv there, and runs C(celery-fleet-app-report) in it. The app is thus
    imported from exactly the code the hosts will install, before any host is changed.
  - The app is imported with C(CELERY_BROKER_URL=memory://) and a minimal environment, so
    importing it never reaches a broker. The throwaway directory is always removed.
  - Changes nothing; runs in check mode too.
options:
  archive:
    description: The wheelhouse archive (C(wheelhouse-<digest>.tar.gz)) on the controller.
    type: path
    required: true
  app:
    description: The module given to C(celery --app), i.e. C(celery_app_module).
    type: str
    required: true
  env:
    description: Extra environment for the import, i.e. C(celery_app_env).
    type: dict
    default: {}
  python:
    description:
      - Interpreter that builds the virtualenv. The wheelhouse is resolved for the targets'
        Python (C(celery_app_python_version)), markers included, so use the same version.
    type: str
    default: python3
  cache_dir:
    description:
      - Directory that caches reports by archive name (which carries the wheelhouse digest),
        app and environment, so a repeated preflight skips the virtualenv.
    type: path
  timeout:
    description: Seconds each step (virtualenv, pip install, import) may take.
    type: int
    default: 300
"""

EXAMPLES = r"""
- name: Read the app's routing from the wheelhouse the hosts will install
  celery_app_report:
    archive: "{{ __celery_app_wheelhouse.archive }}"
    app: "{{ celery_app_module }}"
    env: "{{ celery_app_env }}"
    cache_dir: "{{ celery_app_wheelhouse_cache }}/reports"
  delegate_to: localhost
  run_once: true
  become: false
  register: __app_report
"""

RETURN = r"""
report:
  description:
    - What C(celery-fleet-app-report) printed, keys C(default_queue), C(declared_queues),
      C(routes) (task to queue), C(route_errors), C(routed_queues), C(config) and C(tasks).
  type: dict
  returned: success
cached:
  description: Whether the report came from C(cache_dir) instead of a fresh import.
  type: bool
  returned: success
"""

STDERR_LINES = 15


class ReportError(Exception):
    """A step failed; the message names the step, the app and the cause."""


def cache_key(archive: Path, app: str, env: dict[str, str]) -> str:
    # The archive's name carries the digest of everything in it, the targets' Python included.
    data = json.dumps([archive.name, app, sorted(env.items())])
    return hashlib.sha256(data.encode()).hexdigest()[:32]


def tail(text: str, lines: int = STDERR_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_step(step: str, app: str, cmd: list[str], timeout: int, hint: str = "", **kwargs: Any) -> str:
    """Run one step; its stdout, or a ReportError naming the step, the app and the last lines of stderr."""
    where = f"{step} (celery_app_module {app!r})"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    except subprocess.TimeoutExpired as exc:
        raise ReportError(f"{where} took longer than {timeout} s") from exc
    except OSError as exc:
        raise ReportError(f"{where} could not start {cmd[0]!r}: {exc}") from exc
    if proc.returncode != 0:
        raise ReportError(
            f"{where} failed with exit {proc.returncode}{hint}:\n{tail(proc.stderr or proc.stdout)}"
        )
    return proc.stdout


def unpack(archive: Path, dest: Path) -> Path:
    """Extract the archive; the wheelhouse directory (``<digest>/``) with its requirements.txt."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # refuse links and paths out of dest where Python can
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # our own archive, built on this controller
    houses = [p.parent for p in dest.glob("*/requirements.txt")]
    if len(houses) != 1:
        raise ReportError(f"{archive} is not a wheelhouse archive: no single <digest>/requirements.txt in it")
    return houses[0]


def import_report(archive: Path, app: str, env: dict[str, str], python: str, timeout: int) -> dict[str, Any]:
    """Install the wheelhouse into a throwaway virtualenv and run the app report there."""
    work = Path(tempfile.mkdtemp(prefix="celery-app-report-"))
    try:
        house = unpack(archive, work)
        venv = work / "venv"
        run_step(f"creating a virtualenv with {python}", app, [python, "-m", "venv", str(venv)], timeout)
        python_venv = str(venv / "bin" / "python")
        requirements = str(house / "requirements.txt")
        pip = [python_venv, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
        run_step(
            f"pip install --no-index of {archive.name}",
            app,
            [*pip, "install", "--no-index", "--no-compile", "--find-links", str(house), "-r", requirements],
            timeout,
            hint=f" (the wheelhouse is resolved for celery_app_python_version; is {python} that Python?)",
        )
        # A minimal environment, so the controller's own settings cannot leak into the app,
        # and a memory broker, so importing it never reaches the network.
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),
            "LANG": "C.UTF-8",
            **env,
            "CELERY_BROKER_URL": "memory://",
        }
        out = run_step(
            f"importing the app from {archive.name}",
            app,
            [python_venv, "-m", "celery_fleet.app_report", app],
            timeout,
            hint=" (check celery_app_module and celery_app_env)",
            env=child_env,
            cwd=work,
        )
        try:
            return json.loads(out)
        except ValueError as exc:
            raise ReportError(f"the app report of {app!r} is not JSON: {tail(out, 3)!r}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def app_report(
    archive: Path,
    app: str,
    env: dict[str, Any] | None = None,
    python: str = "python3",
    *,
    cache_dir: Path | None = None,
    timeout: int = 300,
) -> tuple[dict[str, Any], bool]:
    """The app's report and whether it came from the cache."""
    if not archive.is_file():
        raise ReportError(f"wheelhouse archive {archive} does not exist; celery_wheelhouse builds it")
    env_str = {str(k): str(v) for k, v in (env or {}).items()}
    cached = cache_dir / f"app-report-{cache_key(archive, app, env_str)}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text()), True
    report = import_report(archive, app, env_str, python, timeout)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(report, sort_keys=True))
        partial.replace(cached)  # atomic: a concurrent run never reads half a report
    return report, False


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "archive": {"type": "path", "required": True},
            "app": {"type": "str", "required": True},
            "env": {"type": "dict", "default": {}},
            "python": {"type": "str", "default": "python3"},
            "cache_dir": {"type": "path"},
            "timeout": {"type": "int", "default": 300},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        report, cached = app_report(
            Path(p["archive"]),
            p["app"],
            p["env"],
            p["python"],
            cache_dir=Path(p["cache_dir"]) if p["cache_dir"] else None,
            timeout=p["timeout"],
        )
    except ReportError as exc:
        module.fail_json(msg=f"celery_app_report: {exc}")
    module.exit_json(changed=False, report=report, cached=cached)


if __name__ == "__main__":
    main()
