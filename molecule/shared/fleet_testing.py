"""Helpers shared by every scenario's Testinfra tests: run fleet tools on a host as its units do."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def broker_acl():
    """The project's module_utils that names the broker's users and derives their passwords.

    Loaded from its file: it needs only the standard library, and no collection loader runs here."""
    path = ROOT / "collections/ansible_collections/celery_fleet/fleet/plugins/module_utils/broker_acl.py"
    spec = importlib.util.spec_from_file_location("celery_fleet_broker_acl", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROLE_VARS = yaml.safe_load((ROOT / "roles" / "celery_fleet" / "vars" / "main.yml").read_text())


def fleet_paths() -> dict[str, str]:
    """The fleet's paths on a host, from their one source: roles/celery_fleet (its defaults and vars)."""
    defaults = yaml.safe_load((ROOT / "roles" / "celery_fleet" / "defaults" / "main.yml").read_text())
    return {
        key: jinja2.Template(value).render(defaults)
        for key, value in ROLE_VARS["_celery_fleet_paths"].items()
    }


PATHS = fleet_paths()
VENV = PATHS["venv"]
# The status probe as the playbooks run it (roles/celery_fleet/vars: _celery_fleet_status).
STATUS = " ".join(
    jinja2.Template(ROLE_VARS["_celery_fleet_status"]).render(_celery_fleet_paths=PATHS).split()
)
# Load the same environment files the units get, without putting a secret on a command line.
FLEET_ENV = f"set -a; . {PATHS['app_env']}; . {PATHS['broker_env']}; set +a; cd /tmp"


def other(host, name: str):
    """Another host of the scenario's inventory, reached the way ``host`` is."""
    return host.get_host(f"ansible://{name}", ansible_inventory=host.backend.ansible_inventory)


def fleet_json(host, command: str):
    """Run a command with the fleet's environment and parse its JSON output."""
    result = host.run(f"{FLEET_ENV}; timeout 120 {command}")
    assert result.rc == 0, f"{command} failed ({result.rc}):\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def on_host(host, body: str, timeout: int = 150):
    """Run Python against the fleet's broker on the host, as a client of the app; return its JSON output."""
    script = "import json, time\nfrom demo_app.celery import app\n" + body
    result = host.run(f"{FLEET_ENV}; timeout {timeout} {VENV}/bin/python - <<'PY'\n{script}\nPY")
    assert result.rc == 0, f"rc {result.rc}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker_units(host, state: str = "active") -> dict[str, str]:
    """Each worker instance's slot unit in ``state`` (active: the one that serves), by instance name."""
    out = host.run(f"systemctl list-units --state={state} --plain --no-legend 'celery-worker@*'").stdout
    units = [line.split()[0] for line in out.splitlines() if line.strip()]
    return {u.removeprefix("celery-worker@").removesuffix(".service").partition(".")[0]: u for u in units}


def worker_unit(host, instance: str) -> str:
    """The unit that serves ``instance`` now: ``celery-worker@<instance>.a`` or ``.b``."""
    units = worker_units(host)
    assert instance in units, f"no slot of celery-worker@{instance} is active: {units}"
    return units[instance]


def instance_of(node: str) -> str:
    """``high-1.b@host`` (a worker's node name) -> ``high-1``."""
    return node.partition("@")[0].partition(".")[0]


def exposure(host, unit: str) -> float:
    """The unit's overall `systemd-analyze security` exposure score."""
    out = host.run(f"systemd-analyze security --no-pager {unit} | tail -1").stdout
    return float(out.split("service:")[1].split()[0])


def show(host, unit: str, *props: str) -> dict[str, str]:
    """The unit's properties, as `systemctl show` reports them."""
    out = host.run(f"systemctl show {unit} " + " ".join(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(host, unit: str) -> str:
    return host.run(f"journalctl -u {unit} -n 40 --no-pager").stdout


REDIS_COMMAND = """\
import os, sys
from urllib.parse import urlsplit
import redis
url = os.environ["CELERY_BROKER_URL"]
if sys.argv[1] != "auth":  # the same address (and TLS files), as nobody
    parts = urlsplit(url)
    url = parts._replace(netloc=f"{parts.hostname}:{parts.port}").geturl()
client = redis.Redis.from_url(url, socket_timeout=10)
try:
    answer = client.execute_command(*sys.argv[2:])
except redis.RedisError as exc:
    print(type(exc).__name__, exc)
    sys.exit(0)
def text(value):
    if isinstance(value, dict):  # INFO
        import json
        return json.dumps(value, default=str)
    if isinstance(value, list | tuple):
        return "\\n".join(text(v) for v in value)
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))
print(text(answer))
"""


def redis_cli(host, hostvars, *args: str, auth: bool = True):
    """A Redis command as the fleet's admin user, printed one value a line, like redis-cli.

    The admin's credentials are read on the host from its environment file, so none reaches a command
    line. ``auth=False`` connects as nobody (the default user, which is off)."""
    argv = [f"{VENV}/bin/python", "-c", REDIS_COMMAND, "auth" if auth else "none", *args]
    return host.run(f"{FLEET_ENV}; timeout 20 {shlex.join(argv)}")


def redis_info(host, hostvars) -> dict:
    """Redis's INFO, as the admin user reads it (no user may read CONFIG)."""
    result = redis_cli(host, hostvars, "INFO")
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def http_status(host, url: str, user: str | None = None, password: str | None = None) -> int:
    auth = ""
    if user is not None:
        # Credentials reach the probe through its environment, never argv.
        auth = (
            "import base64, os; r.add_header('Authorization', 'Basic ' + "
            "base64.b64encode(os.environ['CRED'].encode()).decode()); "
        )
    script = (
        "import urllib.request, urllib.error\n"
        f"r = urllib.request.Request({url!r}); {auth}\n"
        "try:\n    print(urllib.request.urlopen(r, timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)\n"
    )
    env = f"CRED='{user}:{password}' " if user is not None else ""
    result = host.run(f"{env}python3 - <<'PY'\n{script}PY")
    assert result.rc == 0, result.stderr
    return int(result.stdout.strip())


@pytest.fixture(scope="module")
def hostvars(host):
    """The host's inventory variables, with templated ones (`"{{ vault_... }}"`) resolved by Ansible."""
    raw = host.ansible.get_variables()
    templated = [name for name, value in raw.items() if isinstance(value, str) and "{{" in value]
    resolved = {name: host.ansible("ansible.builtin.debug", f"var={name}")[name] for name in templated}
    return {**raw, **resolved}


def playbook(
    name: str,
    *inventories: str | Path,
    extra_vars: dict | None = None,
    check: bool = False,
    json_output: bool = False,
    limit: str | None = None,
    verbosity: int = 0,
) -> subprocess.CompletedProcess:
    """Run one of the project's playbooks from the controller, as a user would.

    ``check`` adds --check --diff; ``json_output`` makes stdout the json callback's one JSON document.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
    env |= {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_HOME": str(ROOT / ".cache" / "ansible")}
    if json_output:
        env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.builtin.json"
    args = [arg for inventory in inventories for arg in ("-i", str(inventory))]
    if extra_vars:
        args += ["--extra-vars", json.dumps(extra_vars)]
    if check:
        args += ["--check", "--diff"]
    if limit:
        args += ["--limit", limit]
    if verbosity:
        args += ["-" + "v" * verbosity]
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), *args, name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def snapshot(host) -> str:
    """Everything the deploy writes, and every fleet unit's invocation: any change shows."""
    files = host.run(
        f"find /etc {PATHS['root']} -xdev -name __pycache__ -prune -o -printf '%p %s %T@ %m %u\\n' | sort"
        " | sha256sum"
    ).stdout
    units = host.run(
        "systemctl show --property=Id,InvocationID,ActiveState redis-server celery-beat flower "
        "$(systemctl list-units --plain --no-legend 'celery-worker@*' | cut -d' ' -f1)"
    ).stdout
    return files + units


def fleet_secrets(hostvars) -> list[str]:
    """Every secret of the fleet: the vaulted broker password, each Redis user's, Flower's login."""
    acl = broker_acl()
    master = hostvars["redis_password"]
    return [master, hostvars["flower_password"], *(acl.password(master, c) for c in acl.COMPONENTS)]


@contextlib.contextmanager
def process_samples(container: str, out: Path, seconds: int = 900):
    """Write the container's process list (every command line) to ``out`` every 0.1 s, while the block runs.

    The sampler runs in the container and stops at the end of the block, or after ``seconds``."""
    stop = "/run/celery-fleet-test-sampler.stop"
    subprocess.run(["docker", "exec", container, "rm", "-f", stop], check=True, timeout=30)
    loop = f"for i in $(seq {seconds * 10}); do [ -e {stop} ] && exit 0; ps -eo args; sleep 0.1; done"
    with out.open("wb") as sink:
        sampler = subprocess.Popen(["docker", "exec", container, "sh", "-c", loop], stdout=sink)
    try:
        yield
    finally:
        subprocess.run(["docker", "exec", container, "touch", stop], check=False, timeout=30)
        try:
            sampler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sampler.kill()
            sampler.wait(timeout=10)
