"""Shared fixtures: the repository layout, the roles' Python plugins, a real redis-server."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "demo_app" / "src"))
sys.path.insert(0, str(ROOT / "src"))
# The project's own collection (celery_fleet.fleet), found the way ansible.cfg's collections_path finds it,
# so plugins import its module_utils as they do under Ansible.
_AnsibleCollectionFinder(paths=[str(ROOT / "collections")])._install()


def load_plugin(relative: str):
    """Import a role's plugin file as a module, the way Ansible finds it by path."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on loopback, with a password, in a temporary directory."""

    def __init__(self, workdir: Path, extra_conf: str = "", user: str = "") -> None:
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.workdir = workdir
        self.user = user
        # e.g. ACL user lines, read after requirepass; ``user`` becomes an all-powerful user of them.
        self.extra_conf = extra_conf + (f"user {user} on >{self.password} ~* &* +@all\n" if user else "")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.user}:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> None:
        conf = self.workdir / "redis.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\n"
            f'dir {self.workdir}\nsave ""\nappendonly no\n{self.extra_conf}'
        )
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", str(conf)], stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def demo_env(server: RedisServer, **extra: str) -> dict[str, str]:
    """The environment a fleet unit gets: the demo app importable, broker and results on ``server``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "examples" / "demo_app" / "src"), str(ROOT / "src")]),
        "CELERY_BROKER_URL": server.url,
        "CELERY_RESULT_BACKEND": server.url.removesuffix("/0") + "/1",
        **extra,
    }


def start_demo_worker(env: dict[str, str], node: str, queues: str, **popen: object) -> subprocess.Popen:
    """A real solo-pool Celery worker of the demo app, consuming exactly ``queues``."""
    argv = [sys.executable, "-m", "celery", "--app", "demo_app", "worker", f"--hostname={node}"]
    argv += [
        f"--queues={queues}",
        "--pool=solo",
        "--without-mingle",
        "--without-gossip",
        "--loglevel=WARNING",
    ]
    return subprocess.Popen(argv, env=env, **popen)  # type: ignore[call-overload]


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m demo_app.demo``: one probe task through every queue of the app's profile."""
    return subprocess.run(
        [sys.executable, "-m", "demo_app.demo", "--timeout", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def inventory_list(path: Path) -> dict:
    """``ansible-inventory --list`` of an inventory directory: groups and every host's variables."""
    out = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-inventory")), "-i", str(path), "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def run_ansible_module(path: Path, args: dict, work: Path, timeout: int) -> dict:
    """Run a module file the way Ansible does: a JSON argument file, a JSON answer on stdout."""
    args_file = work / f"{path.stem}-args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = subprocess.run(
        [sys.executable, str(path), str(args_file)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=work,
    )
    return json.loads(proc.stdout)


def build_wheelhouse(sources: list[Path], requirements: list[str], work: Path) -> Path:
    """A wheelhouse for this Python, built (or found in .cache by digest) by the deploy's own module."""
    machine = platform.machine()
    answer = run_ansible_module(
        ROOT / "roles/celery_app/library/celery_wheelhouse.py",
        {
            "sources": [str(s) for s in sources],
            "requirements": requirements,
            "python_version": platform.python_version(),
            "platforms": [
                f"manylinux2014_{machine}",
                f"manylinux_2_17_{machine}",
                f"manylinux_2_28_{machine}",
            ],
            "machine": machine,
            "dest": str(ROOT / ".cache" / "wheelhouse"),
        },
        work,
        timeout=600,
    )
    assert not answer.get("failed"), answer
    return Path(answer["archive"])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; run scripts/host-prereqs.sh")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
