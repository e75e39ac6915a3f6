"""The app report: routing computed by Celery itself, and the module that runs it from the wheelhouse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import tomllib
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, build_wheelhouse, load_plugin, run_ansible_module

module = load_plugin("playbooks/library/celery_app_report.py")

# A small app that exercises what the demo app does not: a queue set on the task
# itself, a router that needs the real arguments, tasks registered through
# `imports`, the app found in `<package>.celery`, and output while importing.
PROBE_FILES = {
    "pyproject.toml": """\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "celery-fleet-probe"
        version = "0.1.0"
        dependencies = ["celery>=5.4,<6"]

        [tool.setuptools.packages.find]
        where = ["src"]
        """,
    "src/probe_app/__init__.py": "",
    "src/probe_app/celery.py": """\
        import os

        from celery import Celery
        from kombu import Queue

        print("probe_app says hello on stdout")

        def tenant_router(name, args, kwargs, options, task=None, **_):
            if name == "probe_app.tasks.per_tenant":
                return {"queue": "tenant-" + kwargs["tenant"]}
            return None

        app = Celery("probe_app")
        app.conf.update(
            imports=["probe_app.tasks"],
            task_default_queue=os.environ.get("PROBE_DEFAULT_QUEUE", "probe_default"),
            task_queues=[Queue("probe_default"), Queue("declared_only")],
            task_routes=[tenant_router],
            task_time_limit=120,
            result_expires=None,
        )
        """,
    "src/probe_app/tasks.py": """\
        import os

        from probe_app.celery import app

        @app.task
        def plain():
            return 1

        @app.task(queue=os.environ.get("PROBE_OWN_QUEUE", "own"))
        def own_queue():
            return 1

        @app.task(time_limit=900, soft_time_limit=800, acks_late=False)
        def slow():
            return 1

        @app.task
        def per_tenant(tenant):
            return tenant
        """,
}

# What Celery really does: publish every task to an in-memory broker and record
# the routing key of each message (a kombu Queue's routing key is its name).
PUBLISH_SCRIPT = """\
import json, sys
from celery.app.utils import find_app
from celery.signals import before_task_publish

app = find_app(sys.argv[1])
app.loader.import_default_modules()
published = {}

@before_task_publish.connect
def record(sender=None, routing_key=None, **_):
    published[sender] = routing_key

for name in sys.argv[2:]:
    task = app.tasks[name]
    task.typing = False  # send without the task's real arguments
    task.apply_async()
print(json.dumps(published))
"""


def write_probe(root: Path) -> Path:
    for name, text in PROBE_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def run_python(args: list[str], *paths: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run Python with ``paths``, the demo app and celery_fleet importable, and a memory broker."""
    pythonpath = [*map(str, paths), str(ROOT / "examples" / "demo_app" / "src"), str(ROOT / "src")]
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "CELERY_BROKER_URL": "memory://"}
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        env={**child_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def app_report_of(app: str, *paths: Path, **env: str) -> dict[str, Any]:
    proc = run_python(["-m", "celery_fleet.app_report", app], *paths, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def published_queues(app: str, tasks: list[str], *paths: Path) -> dict[str, str]:
    proc = run_python(["-c", PUBLISH_SCRIPT, app, *tasks], *paths)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])  # the probe app prints while it imports


@pytest.fixture(scope="module")
def probe_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_probe(tmp_path_factory.mktemp("probe"))


def test_demo_app_routes_are_where_celery_publishes():
    report = app_report_of("demo_app")
    from demo_app.celery import app  # noqa: PLC0415 -- conftest puts the demo app on sys.path

    assert report["routes"], "the demo app has routed tasks"
    assert report["route_errors"] == {}
    assert report["routes"] == published_queues("demo_app", sorted(report["routes"]))
    assert report["routed_queues"] == sorted(set(report["routes"].values()))
    assert report["default_queue"] == app.conf.task_default_queue
    assert report["declared_queues"] == [q.name for q in app.conf.task_queues]
    assert set(report["tasks"]) == set(report["routes"])
    assert not any(name.startswith("celery.") for name in report["tasks"])
    config = report["config"]
    assert config["visibility_timeout"] == app.conf.broker_transport_options["visibility_timeout"]
    assert config["visibility_timeout_set"] is True
    assert config["task_acks_late"] == app.conf.task_acks_late
    assert config["worker_prefetch_multiplier"] == app.conf.worker_prefetch_multiplier
    assert config["result_expires"] == app.conf.result_expires


def test_probe_app_task_options_routers_and_defaults(probe_project):
    src = probe_project / "src"
    report = app_report_of("probe_app", src)  # found as probe_app.celery:app, like `celery --app`
    routable = sorted(report["routes"])
    assert routable == ["probe_app.tasks.own_queue", "probe_app.tasks.plain", "probe_app.tasks.slow"]
    assert report["routes"] == published_queues("probe_app", routable, src)
    assert report["routes"]["probe_app.tasks.own_queue"] == "own"  # the task's own queue option
    assert report["routes"]["probe_app.tasks.plain"] == report["default_queue"] == "probe_default"
    assert list(report["route_errors"]) == ["probe_app.tasks.per_tenant"]
    assert "KeyError" in report["route_errors"]["probe_app.tasks.per_tenant"]
    assert report["declared_queues"] == ["probe_default", "declared_only"]
    from kombu.transport.redis import Channel  # noqa: PLC0415

    config = report["config"]
    assert config["visibility_timeout"] == Channel.visibility_timeout
    assert config["visibility_timeout_set"] is False
    assert config["result_expires"] is None
    assert config["task_time_limit"] == 120
    assert report["tasks"]["probe_app.tasks.slow"] == {
        "acks_late": False,
        "time_limit": 900,
        "soft_time_limit": 800,
    }
    assert report["tasks"]["probe_app.tasks.plain"] == {
        "acks_late": False,
        "time_limit": 120,
        "soft_time_limit": None,
    }


def test_environment_reaches_the_app(probe_project):
    report = app_report_of("probe_app", probe_project / "src", PROBE_DEFAULT_QUEUE="from-env")
    assert report["routes"]["probe_app.tasks.plain"] == "from-env"
    assert report["routed_queues"] == ["from-env", "own"]


@pytest.mark.parametrize(
    ("app", "source", "fragment"),
    [
        ("no_such_app", None, "ModuleNotFoundError: No module named 'no_such_app'"),
        ("broken_app", "raise RuntimeError('boom\\nsecond line')\n", "RuntimeError: boom second line"),
        ("no_celery_here", "X = 1\n", "no_celery_here"),
    ],
)
def test_an_app_that_does_not_import_fails_in_one_line(tmp_path, app, source, fragment):
    if source is not None:
        (tmp_path / f"{app}.py").write_text(source)
    proc = run_python(["-m", "celery_fleet.app_report", app], tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("celery-fleet-app-report:")]
    assert f"cannot load Celery app {app!r}" in line
    assert fragment in line


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    target = scripts["celery-fleet-app-report"]
    module_name, func = target.split(":")
    assert getattr(import_module(module_name), func) is import_module("celery_fleet.app_report").main


# The module, against a real wheelhouse built by the celery_wheelhouse module.


@pytest.fixture(scope="module")
def wheelhouse(probe_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo app, the probe app, celery-fleet and Flower for this Python; cached by digest."""
    sources = [ROOT / "examples" / "demo_app", probe_project, ROOT]
    return build_wheelhouse(sources, ["flower==2.2.0"], tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module's temporary directories go here, so a test sees whether they are removed."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


# What the units' command lines could hold: what preflight must see, and what a parser refuses.
ARGUMENTS = [
    {"command": "worker", "args": ["-EB", "--hostname=ingest@%h", "-Qa,b", "task_default_queue=x"]},
    {"command": "worker", "args": ["-A", "probe_app"]},
    {"command": "beat", "args": ["--schedule", "/tmp/schedule", "--no-enable-remote-control"]},
    {"command": "flower", "args": ["--address=127.0.0.1", "--port=5555", "--basic-auth=u:p", "-A", "x"]},
    {"command": "flower", "args": ["--port", "5555"]},
]


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every command the module runs, in order."""
    ran: list[list[str]] = []
    real = subprocess.run

    def run(cmd, *args, **kwargs):
        ran.append([str(c) for c in cmd])
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(module.subprocess, "run", run)
    return ran


def test_module_reports_every_app_and_parses_the_command_lines_in_one_venv(
    wheelhouse, probe_project, scratch, steps, tmp_path
):
    cache = tmp_path / "cache"
    apps = ["demo_app", "probe_app", "demo_app"]
    answer, cached = module.fleet_report(
        wheelhouse, apps, {}, sys.executable, arguments=ARGUMENTS, cache_dir=cache
    )
    assert cached is False
    # One virtualenv and one install; each distinct app in its own process; one parse.
    assert sum("venv" in cmd for cmd in steps) == 1
    assert sum("install" in cmd for cmd in steps) == 1
    assert [cmd[-1] for cmd in steps if "celery_fleet.app_report" in cmd] == ["demo_app", "probe_app"]
    assert sum("celery_fleet.cli_report" in cmd for cmd in steps) == 1
    assert list(answer["reports"]) == ["demo_app", "probe_app"]
    # The wheelhouse holds the same apps as the tree.
    assert answer["reports"]["demo_app"] == app_report_of("demo_app")
    assert answer["reports"]["probe_app"] == app_report_of("probe_app", probe_project / "src")
    cli = answer["cli"]
    assert set(cli) == {"parsed", "envvars", "flower_envvars"}
    assert cli["parsed"] == [
        {
            "set": ["task_events", "beat", "hostname", "queues"],
            "extra": ["task_default_queue=x"],
            "error": None,
        },
        {"set": [], "extra": [], "error": "No such option '-A'."},
        {"set": ["schedule", "remote_control"], "extra": [], "error": None},
        {"set": ["address", "port", "basic_auth"], "extra": ["-A", "x"], "error": None},
        {"set": [], "extra": [], "error": "Option 'port' requires a value"},
    ]
    assert {"CELERY_WORKER_BEAT", "CELERY_APP", "APP", "BROKER_URL"} <= set(cli["envvars"])
    assert "FLOWER_BASIC_AUTH" in cli["flower_envvars"]  # Flower is in this wheelhouse
    assert list(scratch.iterdir()) == []
    assert len(list(cache.glob("app-report-*.json"))) == 1
    # A cached answer needs no interpreter at all: no virtualenv is built.
    steps.clear()
    again = module.fleet_report(
        wheelhouse, apps, {}, "/nonexistent/python", arguments=ARGUMENTS, cache_dir=cache
    )
    assert again == (answer, True)
    assert steps == []
    # Through AnsibleModule, as a playbook calls it; check mode runs it too.
    answer_ansible = run_ansible_module(
        ROOT / "playbooks/library/celery_app_report.py",
        {
            "archive": str(wheelhouse),
            "apps": apps,
            "arguments": ARGUMENTS,
            "cache_dir": str(cache),
            "_ansible_check_mode": True,
        },
        tmp_path,
        timeout=60,
    )
    assert answer_ansible["changed"] is False
    assert answer_ansible["cached"] is True
    assert answer_ansible["reports"] == answer["reports"]
    assert answer_ansible["cli"] == answer["cli"]


def test_module_passes_only_the_given_environment(wheelhouse, scratch, monkeypatch):
    monkeypatch.setenv("PROBE_DEFAULT_QUEUE", "leaked-from-the-controller")
    report, _ = module.app_report(wheelhouse, "probe_app", {"PROBE_OWN_QUEUE": "from-env"}, sys.executable)
    assert report["routes"]["probe_app.tasks.own_queue"] == "from-env"
    assert report["default_queue"] == "probe_default"
    assert list(scratch.iterdir()) == []


def test_cache_key_follows_archive_apps_environment_and_arguments():
    archive = Path("/cache/wheelhouse-0123456789abcdef.tar.gz")
    worker = [{"command": "worker", "args": ["-B"]}]
    key = module.cache_key(archive, ["demo_app"], {"A": "1", "B": "2"}, worker)
    assert key == module.cache_key(archive, ["demo_app"], {"B": "2", "A": "1"}, worker)
    assert key != module.cache_key(archive, ["demo_app"], {"A": "1", "B": "3"}, worker)
    assert key != module.cache_key(archive, ["probe_app"], {"A": "1", "B": "2"}, worker)
    assert key != module.cache_key(archive, ["demo_app", "probe_app"], {"A": "1", "B": "2"}, worker)
    assert key != module.cache_key(archive, ["demo_app"], {"A": "1", "B": "2"}, [])
    assert key != module.cache_key(
        archive, ["demo_app"], {"A": "1", "B": "2"}, [{"command": "worker", "args": ["-E"]}]
    )
    other = archive.with_name("wheelhouse-fedcba9876543210.tar.gz")
    assert module.cache_key(archive, ["demo_app"], {}, []) != module.cache_key(other, ["demo_app"], {}, [])


def test_module_names_the_app_when_it_does_not_import(wheelhouse, scratch, tmp_path):
    with pytest.raises(module.ReportError) as failure:
        module.fleet_report(
            wheelhouse, ["demo_app", "no_such_app"], {}, sys.executable, cache_dir=tmp_path / "cache"
        )
    message = str(failure.value)
    assert message.startswith(f"importing the app from {wheelhouse.name} (app 'no_such_app') failed")
    assert "ModuleNotFoundError: No module named 'no_such_app'" in message
    assert list(scratch.iterdir()) == []
    # Failures are never cached (the virtualenv of the wheelhouse is, as it is the same for every app).
    assert not list((tmp_path / "cache").glob("app-report-*"))


def test_module_fails_with_the_message_through_ansible(tmp_path):
    missing = tmp_path / "wheelhouse-0123456789abcdef.tar.gz"
    answer = run_ansible_module(
        ROOT / "playbooks/library/celery_app_report.py",
        {"archive": str(missing), "apps": ["demo_app"]},
        tmp_path,
        60,
    )
    assert answer["failed"] is True
    assert answer["msg"].startswith(
        f"fleet: celery_app_report: wheelhouse archive {missing} does not exist; celery_wheelhouse builds it"
    )
    assert "Fix:" in answer["msg"]


def test_module_names_the_pip_step_when_the_wheelhouse_is_incomplete(scratch, tmp_path):
    house = tmp_path / "0123456789abcdef"
    house.mkdir()
    (house / "requirements.txt").write_text("not-in-this-house==1.0\n")
    archive = tmp_path / "wheelhouse-0123456789abcdef.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(house, arcname=house.name)
    with pytest.raises(module.ReportError) as failure:
        module.fleet_report(archive, ["demo_app", "probe_app"], {}, sys.executable)
    message = str(failure.value)
    assert message.startswith(f"pip install --no-index of {archive.name} (apps 'demo_app', 'probe_app')")
    assert "not-in-this-house" in message
    assert list(scratch.iterdir()) == []


def test_module_refuses_what_is_not_a_wheelhouse(scratch, tmp_path):
    with pytest.raises(module.ReportError, match="does not exist"):
        module.app_report(tmp_path / "missing.tar.gz", "demo_app")
    archive = tmp_path / "other.tar.gz"
    (tmp_path / "note.txt").write_text("not a wheelhouse\n")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "note.txt", arcname="note.txt")
    with pytest.raises(module.ReportError, match="is not a wheelhouse archive"):
        module.app_report(archive, "demo_app")
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"apps": []}, "apps is empty"),
        ({"apps": ["demo_app"], "arguments": [{"command": "celery", "args": []}]}, "command"),
        ({"apps": ["demo_app"], "arguments": [{"args": ["-B"]}]}, "command"),
        ({"app": "demo_app"}, "apps"),
    ],
)
def test_module_refuses_bad_options_through_ansible(tmp_path, args, fragment):
    archive = tmp_path / "wheelhouse-0123456789abcdef.tar.gz"
    archive.write_bytes(b"")  # validation comes first; nothing is unpacked
    answer = run_ansible_module(
        ROOT / "playbooks/library/celery_app_report.py", {"archive": str(archive), **args}, tmp_path, 60
    )
    assert answer["failed"] is True
    assert fragment in answer["msg"]


def test_documentation_matches_the_argument_spec():
    import yaml  # noqa: PLC0415

    keys = ("type", "elements", "required", "default", "choices")

    def shape(options: dict) -> dict:
        return {
            name: {
                **{k: v for k, v in spec.items() if k in keys and v not in (None, False)},
                **({"options": shape(spec["options"])} if "options" in spec else {}),
            }
            for name, spec in options.items()
        }

    documented = yaml.safe_load(module.DOCUMENTATION)["options"]
    for spec in documented.values():  # the documentation's word for the spec's "options"
        if "suboptions" in spec:
            spec["options"] = spec.pop("suboptions")
    assert shape(documented) == shape(module.ARGUMENT_SPEC)
    returned = yaml.safe_load(module.RETURN)
    assert set(returned) == {"reports", "cli", "cached"}
    assert set(returned["cli"]["contains"]) == {"parsed", "envvars", "flower_envvars"}
