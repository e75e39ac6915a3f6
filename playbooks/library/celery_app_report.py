#!/usr/bin/python
"""Import the fleet's Celery apps from the deploy's own wheelhouse, on the controller, and report them."""

from __future__ import annotations

import contextlib
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
short_description: Report Celery apps' routing and parse Celery command lines from a wheelhouse
description:
  - Runs on the controller (C(delegate_to) C(localhost)). Unpacks the wheelhouse archive that
    C(celery_wheelhouse) built into a throwaway directory, installs it with C(pip --no-index)
    into ONE fresh virtualenv there, and in it runs C(python -m celery_fleet.app_report) once
    per app, each in its own process, and C(python -m celery_fleet.cli_report) once. The apps
    are thus imported, and the command lines parsed, by exactly the code the hosts will
    install, before any host is changed.
  - The apps are imported with C(CELERY_BROKER_URL=memory://) and a minimal environment, so
    importing them never reaches a broker. The throwaway directory is always removed.
  - Command lines are parsed by the wheelhouse's own parsers, tokenizers only (no type
    conversion, no callbacks), so they need no app. Those of C(celery worker) and
    C(celery beat) by click's parser of that command; those of C(celery flower) by click,
    then Flower's own filter of its arguments, then a fresh tornado option parser carrying
    copies of Flower's option definitions.
  - Changes nothing; runs in check mode too.
options:
  archive:
    description: The wheelhouse archive (C(wheelhouse-<digest>.tar.gz)) on the controller.
    type: path
    required: true
  apps:
    description:
      - The modules given to C(celery --app), one per distinct app module of the fleet's
        components (C(celery_fleet_app), each worker entry's C(app), C(celery_beat_app)).
        Duplicates are dropped, the order is kept.
    type: list
    elements: str
    required: true
  env:
    description: Extra environment for the imports, i.e. C(celery_app_env).
    type: dict
    default: {}
  arguments:
    description:
      - Command lines to parse, each the arguments after C(celery [--app ...] <command>).
    type: list
    elements: dict
    default: []
    suboptions:
      command:
        description: The Celery subcommand.
        type: str
        required: true
        choices: [worker, beat, flower]
      args:
        description: Its arguments, one per list item, as systemd would pass them.
        type: list
        elements: str
        default: []
  python:
    description:
      - Interpreter that builds the virtualenv. The wheelhouse is resolved for the targets'
        Python (C(celery_app_python_version)), markers included, so use the same version.
    type: str
    default: python3
  cache_dir:
    description:
      - Directory that caches answers by archive name (which carries the wheelhouse digest),
        apps, environment and arguments, so a repeated preflight skips the virtualenv.
      - It also keeps one virtualenv per wheelhouse (C(venv-<archive>-<python>)), so a preflight with other
        apps or arguments imports and parses without installing the wheels again.
    type: path
  timeout:
    description: Seconds each step (virtualenv, pip install, each import, the parse) may take.
    type: int
    default: 300
"""

EXAMPLES = r"""
- name: Read the apps' routing and parse the units' command lines with the wheelhouse the hosts will install
  celery_app_report:
    archive: "{{ __celery_app_wheelhouse.archive }}"
    apps: ["{{ celery_fleet_app }}", pkg.apps.ingest]
    env: "{{ celery_app_env }}"
    arguments:
      - {command: worker, args: [--hostname=ingest@%h, -Q, ingest, --without-mingle]}
      - {command: beat, args: [--schedule=/var/lib/celery/beat-schedule]}
      - {command: flower, args: [--address=127.0.0.1, --port=5555]}
    cache_dir: "{{ celery_app_wheelhouse_cache }}/reports"
  delegate_to: localhost
  run_once: true
  become: false
  register: __app_report

- name: Refuse a worker that would start an embedded beat
  ansible.builtin.assert:
    that: "'beat' not in __app_report.cli.parsed[0].set"
"""

RETURN = r"""
reports:
  description:
    - One entry per distinct app of O(apps), keyed by the app module. Each is what
      C(celery_fleet.app_report) printed, keys C(default_queue), C(declared_queues),
      C(routes) (task to queue), C(route_errors), C(routed_queues), C(config) and C(tasks).
  type: dict
  returned: success
cli:
  description: What C(celery_fleet.cli_report) printed for O(arguments).
  type: dict
  returned: success
  contains:
    parsed:
      description:
        - One entry per item of O(arguments), in order, each C({set, extra, error}).
        - C(set) lists the options the arguments set, once each, in first-seen order. For
          C(worker) and C(beat), click parameter names (C(beat), C(queues), C(hostname),
          C(_click_default_help) for C(--help)); for C(flower), tornado option names with
          underscores (C(port), C(basic_auth), C(address)), after any click-level names.
        - C(extra) lists, verbatim, for C(worker) and C(beat) the positional leftovers, which
          Celery hands to C(app.config_from_cmdline) as configuration overrides (C(key=value));
          for C(flower), the arguments Flower silently drops because they name none of its
          options, then those after tornado's last option.
        - C(error) is null, or the parser's one-line message for what it refuses (an unknown
          option, a missing value, a value tornado cannot convert). C(set) and C(extra) are
          then empty. C(flower is not installed in the wheelhouse) when it is not.
      type: list
      elements: dict
    envvars:
      description:
        - Sorted names of every environment variable the C(celery) command line reads for the
          group and its C(worker) and C(beat) subcommands, derived from the click tree; each
          parameter's own envvar (C(APP), C(BROKER_URL)) and the automatic one
          (C(CELERY_<NAME>) for the group, C(CELERY_WORKER_<NAME>), C(CELERY_BEAT_<NAME>)).
      type: list
      elements: str
    flower_envvars:
      description: Sorted C(FLOWER_<OPTION>) names Flower reads for its options; empty without Flower.
      type: list
      elements: str
cached:
  description: Whether the answer came from C(cache_dir) instead of a fresh virtualenv.
  type: bool
  returned: success
"""

ARGUMENT_SPEC: dict[str, Any] = {
    "archive": {"type": "path", "required": True},
    "apps": {"type": "list", "elements": "str", "required": True},
    "env": {"type": "dict", "default": {}},
    "arguments": {
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "command": {"type": "str", "required": True, "choices": ["worker", "beat", "flower"]},
            "args": {"type": "list", "elements": "str", "default": []},
        },
    },
    "python": {"type": "str", "default": "python3"},
    "cache_dir": {"type": "path"},
    "timeout": {"type": "int", "default": 300},
}

STDERR_LINES = 15


class ReportError(Exception):
    """A step failed; the message names the step, the app(s) and the cause."""


def distinct(apps: list[str]) -> list[str]:
    return list(dict.fromkeys(apps))


def naming(apps: list[str]) -> str:
    """How a step's message names the apps it was for."""
    if len(apps) == 1:
        return f"app {apps[0]!r}"
    return f"apps {', '.join(map(repr, apps))}"


def cache_key(
    archive: Path, apps: list[str], env: dict[str, str], arguments: list[dict[str, Any]] | None = None
) -> str:
    # The archive's name carries the digest of everything in it, the targets' Python included.
    data = json.dumps(
        {"archive": archive.name, "apps": apps, "env": sorted(env.items()), "arguments": arguments or []},
        sort_keys=True,
    )
    return hashlib.sha256(data.encode()).hexdigest()[:32]


def tail(text: str, lines: int = STDERR_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_step(step: str, who: str, cmd: list[str], timeout: int, hint: str = "", **kwargs: Any) -> str:
    """Run one step; its stdout, or a ReportError naming the step, ``who`` and the last lines of stderr."""
    where = f"{step} ({who})"
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


def run_json(step: str, who: str, cmd: list[str], timeout: int, hint: str = "", **kwargs: Any) -> Any:
    out = run_step(step, who, cmd, timeout, hint, **kwargs)
    try:
        return json.loads(out)
    except ValueError as exc:
        raise ReportError(f"{step} ({who}) printed no JSON: {tail(out, 3)!r}") from exc


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


def install(archive: Path, work: Path, python: str, who: str, timeout: int) -> str:
    """Unpack the wheelhouse into ``work`` and install it into a virtualenv there; its python."""
    house = unpack(archive, work)
    venv = work / "venv"
    run_step(f"creating a virtualenv with {python}", who, [python, "-m", "venv", str(venv)], timeout)
    python_venv = str(venv / "bin" / "python")
    requirements = str(house / "requirements.txt")
    pip = [python_venv, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    run_step(
        f"pip install --no-index of {archive.name}",
        who,
        [*pip, "install", "--no-index", "--no-compile", "--find-links", str(house), "-r", requirements],
        timeout,
        hint=f" (the wheelhouse is resolved for celery_app_python_version; is {python} that Python?)",
    )
    return python_venv


def cached_install(archive: Path, python: str, who: str, timeout: int, cache_dir: Path) -> str:
    """The python of a virtualenv of ``archive`` kept in ``cache_dir``, built once per wheelhouse.

    A wheelhouse never changes under its digest, so neither does its virtualenv: later preflights with
    other arguments or apps reuse it instead of installing the same wheels again. It is built aside
    and renamed into place, so a concurrent run sees a whole one or none.
    """
    name = f"venv-{archive.name.removesuffix('.tar.gz')}-{Path(python).name}"
    home = cache_dir / name
    if not (home / ".complete").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
        try:
            install(archive, work, python, who, timeout)
            (work / ".complete").write_text(archive.name + "\n")
            with contextlib.suppress(OSError):  # another run put one there first: use that
                work.rename(home)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    # A virtualenv moved after it was built still works through ``bin/python -m``.
    return str(home / "venv" / "bin" / "python")


def child_environment(work: Path, env: dict[str, str]) -> dict[str, str]:
    # A minimal environment, so the controller's own settings cannot leak into the apps,
    # and a memory broker, so importing them never reaches the network.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "LANG": "C.UTF-8",
        **env,
        "CELERY_BROKER_URL": "memory://",
    }


def import_reports(
    archive: Path,
    apps: list[str],
    env: dict[str, str],
    arguments: list[dict[str, Any]],
    *,
    python: str,
    timeout: int,
    venv_cache: Path | None = None,
) -> dict[str, Any]:
    """Install the wheelhouse into one virtualenv; each app's report, the parsed command lines.

    The virtualenv is a throwaway one, or with ``venv_cache`` one kept there per wheelhouse.
    """
    work = Path(tempfile.mkdtemp(prefix="celery-app-report-"))
    try:
        if venv_cache is None:
            python_venv = install(archive, work, python, naming(apps), timeout)
        else:
            python_venv = cached_install(archive, python, naming(apps), timeout, venv_cache)
        child = {"env": child_environment(work, env), "cwd": work}
        # One process per app: an app's import has side effects (signals, the current app).
        reports = {
            app: run_json(
                f"importing the app from {archive.name}",
                naming([app]),
                [python_venv, "-m", "celery_fleet.app_report", app],
                timeout,
                hint=" (check the app module and celery_app_env)",
                **child,
            )
            for app in apps
        }
        cli = run_json(
            f"parsing the command lines with the Celery of {archive.name}",
            naming(apps),
            [python_venv, "-m", "celery_fleet.cli_report"],
            timeout,
            input=json.dumps(arguments),
            **child,
        )
        return {"reports": reports, "cli": cli}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fleet_report(
    archive: Path,
    apps: list[str],
    env: dict[str, Any] | None = None,
    python: str = "python3",
    *,
    arguments: list[dict[str, Any]] | None = None,
    cache_dir: Path | None = None,
    timeout: int = 300,
) -> tuple[dict[str, Any], bool]:
    """``{"reports": {app: report}, "cli": {...}}`` and whether it came from the cache."""
    if not archive.is_file():
        raise ReportError(f"wheelhouse archive {archive} does not exist; celery_wheelhouse builds it")
    apps = distinct([str(a) for a in apps])
    if not apps:
        raise ReportError("apps is empty: name at least one Celery app module")
    env_str = {str(k): str(v) for k, v in (env or {}).items()}
    argv = [
        {"command": str(a["command"]), "args": [str(x) for x in a.get("args") or []]} for a in arguments or ()
    ]
    key = cache_key(archive, apps, env_str, argv)
    cached = cache_dir / f"app-report-{key}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text()), True
    answer = import_reports(
        archive, apps, env_str, argv, python=python, timeout=timeout, venv_cache=cache_dir
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(answer, sort_keys=True))
        partial.replace(cached)  # atomic: a concurrent run never reads half an answer
    return answer, False


def app_report(
    archive: Path,
    app: str,
    env: dict[str, Any] | None = None,
    python: str = "python3",
    *,
    cache_dir: Path | None = None,
    timeout: int = 300,
) -> tuple[dict[str, Any], bool]:
    """One app's report and whether it came from the cache."""
    answer, cached = fleet_report(archive, [app], env, python, cache_dir=cache_dir, timeout=timeout)
    return answer["reports"][app], cached


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        answer, cached = fleet_report(
            Path(p["archive"]),
            p["apps"],
            p["env"],
            p["python"],
            arguments=p["arguments"],
            cache_dir=Path(p["cache_dir"]) if p["cache_dir"] else None,
            timeout=p["timeout"],
        )
    except ReportError as exc:
        # The wheelhouse and the apps are the fleet's: the message starts as every preflight refusal does.
        module.fail_json(
            msg=f"fleet: celery_app_report: {exc} Fix: check the app modules (celery_fleet_app, the worker "
            "entries' app, celery_beat_app), celery_app_env and celery_app_sources."
        )
    module.exit_json(changed=False, reports=answer["reports"], cli=answer["cli"], cached=cached)


if __name__ == "__main__":
    main()
