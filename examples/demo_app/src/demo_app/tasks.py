"""Tasks that do real work and report where they ran.

They are shared tasks: every app made by ``demo_app.celery.make_app`` (the base
``demo_app`` and each ``demo_app.apps.<component>``) includes this module and
registers all of them, each bound to that app, with its ``DeliveryCappedTask``
base. A task body reaches the broker through the app running it (``self.app``),
never through a module-level app.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import redis
from celery import Celery, current_app, shared_task, signature
from celery.signals import before_task_publish

from demo_app.celery import PROFILE

TICKS_KEY = "demo:ticks"
RUNS_KEY = "demo:runs"
RECORDS_KEY = "demo:records"
CRASHES_KEY = "demo:crashes"
DISPATCHED_AT = "demo_dispatched_at"
# The name (``main``) of the app that published a tick: beat's app, when beat sent it.
SENDER_APP = "demo_sender_app"
MIB = 1024 * 1024
PAGE = 4096
# Thread-pool sizes of numeric libraries, as the unit's environment sets them.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMEXPR_MAX_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "RAYON_NUM_THREADS",
)


@before_task_publish.connect(sender="demo_app.tasks.tick")
def _stamp_dispatch_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the tick's message when beat sends it: its slot is decided then, not when a worker runs it.

    It also names the publishing app: the signal does not pass it, but beat,
    like a worker, makes its app the current one, so under ``celery -A
    demo_app.apps.beat beat`` this is ``demo_app.apps.beat``.
    """
    if headers is not None:
        headers[DISPATCHED_AT] = time.time()
        headers[SENDER_APP] = current_app.main


def _where(task: Any) -> dict[str, Any]:
    """Describe the host, the worker node and the GPU this task ran on."""
    return {
        "hostname": socket.gethostname(),
        "worker": task.request.hostname,
        "queue": (task.request.delivery_info or {}).get("routing_key"),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


@contextmanager
def _broker_redis(app: Celery) -> Iterator[redis.Redis]:
    """A short-lived client of ``app``'s broker Redis; timeouts, so a paused broker cannot hang a task."""
    client = redis.Redis.from_url(app.conf.broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield client
    finally:
        client.close()


def _digest(data: bytes, rounds: int) -> str:
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()


@shared_task(bind=True)
def ping(self: Any) -> dict[str, Any]:
    return {"pong": True, **_where(self)}


@shared_task(bind=True)
def whoami(self: Any) -> dict[str, Any]:
    """Which app the consuming worker runs (``demo_app`` or ``demo_app.apps.<component>``), and where."""
    return {"app": self.app.main, **_where(self)}


@shared_task(bind=True)
def download_dataset(self: Any, name: str, size_kb: int = 64) -> dict[str, Any]:
    payload = os.urandom(size_kb * 1024)
    return {"dataset": name, "bytes": len(payload), "sha256": _digest(payload, 1), **_where(self)}


@shared_task(bind=True)
def tokenize(self: Any, text: str) -> dict[str, Any]:
    tokens = text.split()
    return {"tokens": len(tokens), "vocab": len(set(tokens)), **_where(self)}


@shared_task(bind=True)
def train(self: Any, steps: int = 2000) -> dict[str, Any]:
    return {"steps": steps, "checkpoint": _digest(b"weights", steps), **_where(self)}


@shared_task(bind=True)
def extract_features(self: Any, rows: int = 1000) -> dict[str, Any]:
    features = [_digest(str(i).encode(), 1)[:8] for i in range(rows)]
    return {"features": len(features), **_where(self)}


@shared_task(bind=True)
def cleanup(self: Any) -> dict[str, Any]:
    return {"cleaned": True, **_where(self)}


@shared_task(bind=True)
def sleep(self: Any, seconds: float) -> dict[str, Any]:
    """Hold a worker process busy, for restart and load tests.

    Each run that finishes appends its task id to ``demo:runs``, so a test can
    check that every task ran exactly once across restarts.
    """
    time.sleep(seconds)
    with _broker_redis(self.app) as client:
        client.rpush(RUNS_KEY, self.request.id)
    return {"slept": seconds, **_where(self)}


def release() -> str:
    """The release this process runs: its virtualenv's directory name (a release digest on a fleet host)."""
    return os.path.basename(sys.prefix)


@shared_task(bind=True)
def record(self: Any, seconds: float) -> dict[str, Any]:
    """Sleep, then append what ran where to ``demo:records``: the load test's ledger.

    Each record holds the task id, its queue, the worker and the release it ran on, and when it
    started and finished (the host's clock), so a test can tell lost, repeated and late tasks.
    """
    started = time.time()
    time.sleep(seconds)
    entry = {
        "id": self.request.id,
        "queue": (self.request.delivery_info or {}).get("routing_key"),
        "worker": self.request.hostname,
        "release": release(),
        "started": started,
        "finished": time.time(),
    }
    with _broker_redis(self.app) as client:
        client.rpush(RECORDS_KEY, json.dumps(entry))
    return entry


@shared_task(bind=True)
def hog(self: Any, mb: int, hold: float = 0.0) -> dict[str, Any]:
    """Allocate ``mb`` MiB and touch every page, so it is resident: the OOM test's memory hog."""
    buffer = bytearray(mb * MIB)
    buffer[::PAGE] = b"\x01" * (len(buffer) // PAGE)
    time.sleep(hold)
    del buffer
    return {"allocated_mb": mb, **_where(self)}


@shared_task(bind=True)
def crash(self: Any) -> NoReturn:
    """SIGKILL this task's own process on every delivery: a stand-in for an OOM kill.

    Each run is recorded in ``demo:crashes`` first. Under a solo or threads
    pool it kills the whole worker; never call it in-process.
    """
    with _broker_redis(self.app) as client:
        client.rpush(CRASHES_KEY, self.request.id)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL was not delivered")


@shared_task(bind=True)
def reach(self: Any, pid: int) -> dict[str, Any]:
    """What this task can do to process ``pid``: read its environment, and signal it (signal 0).

    Each is ``ok`` or the errno name: the isolation test's probe that a task cannot read beat's or
    Flower's secrets or signal them.
    """
    out: dict[str, Any] = {}
    try:
        Path(f"/proc/{pid}/environ").read_bytes()
        out["environ"] = "ok"
    except OSError as exc:
        out["environ"] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    try:
        os.kill(pid, 0)
        out["signal"] = "ok"
    except OSError as exc:
        out["signal"] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return {**out, "pid": os.getpid(), **_where(self)}


@shared_task(bind=True)
def gpu_probe(self: Any, paths: list[str] | None = None) -> dict[str, Any]:
    """What this unit sees of the GPUs: its pinning, thread caps, CPU set, and which device nodes open.

    Each path maps to ``ok`` or the errno name of the failed open: under
    DevicePolicy=closed a foreign GPU node gives EPERM, and a node the unit
    may use but that has no driver behind it gives ENXIO.
    """
    devices: dict[str, str] = {}
    for path in sorted(glob.glob("/dev/nvidia*")) if paths is None else paths:
        try:
            os.close(os.open(path, os.O_RDWR))
            devices[path] = "ok"
        except OSError as exc:
            devices[path] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return {
        **_where(self),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "threads": {name: os.environ[name] for name in THREAD_VARS if name in os.environ},
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "devices": devices,
    }


def work(self: Any, *args: Any, rounds: int = 1000, **kwargs: Any) -> dict[str, Any]:
    """The body of every seed task of the active profile: a little CPU work, then where it ran."""
    return {"task": self.name, "digest": _digest(repr((args, kwargs)).encode(), rounds), **_where(self)}


@shared_task(bind=True)
def tick(self: Any) -> dict[str, Any]:
    """The periodic task beat dispatches; a checker of duplicate and missing ticks.

    Every run is recorded in Redis as ``<dispatch time> <task id> <worker>
    <run time> <sender app>``: the sender app is the ``demo_sender_app``
    header, the app that published the tick (``-`` if it was sent without the
    header). The schedule is aligned to the clock, so the slot of a dispatch
    is ``floor(dispatch time / DEMO_TICK_SECONDS)``: two dispatches in one slot
    mean two beats sent it.
    """
    where = _where(self)
    now = time.time()
    dispatched = float(self.request.get(DISPATCHED_AT) or now)
    sender = str(self.request.get(SENDER_APP) or "-").replace(" ", "_")
    with _broker_redis(self.app) as client:
        client.rpush(TICKS_KEY, f"{dispatched:.3f} {self.request.id} {where['worker']} {now:.3f} {sender}")
        client.ltrim(TICKS_KEY, -5000, -1)
    return {**where, "sender_app": sender}


# The seed app's task names, each served by the generic body.
SEED_TASKS = {name: shared_task(name=name, bind=True)(work) for name in PROFILE.seed_tasks}

# The task each queue of the profile is exercised with by `python -m demo_app.demo` and the tests;
# unbound signatures, sent through the current app.
QUEUE_PROBES = {queue: (signature(name), args) for queue, (name, args) in PROFILE.probes.items()}
