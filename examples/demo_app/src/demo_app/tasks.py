"""Tasks that do real work and report where they ran."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

import redis
from celery.signals import before_task_publish

from demo_app.celery import app

TICKS_KEY = "demo:ticks"
DISPATCHED_AT = "demo_dispatched_at"


@before_task_publish.connect(sender="demo_app.tasks.tick")
def _stamp_dispatch_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Stamp the tick's message when beat sends it: its slot is decided then, not when a worker runs it."""
    if headers is not None:
        headers[DISPATCHED_AT] = time.time()


def _where(task: Any) -> dict[str, Any]:
    """Describe the host, the worker node and the GPU this task ran on."""
    return {
        "hostname": socket.gethostname(),
        "worker": task.request.hostname,
        "queue": (task.request.delivery_info or {}).get("routing_key"),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _digest(data: bytes, rounds: int) -> str:
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()


@app.task(bind=True)
def ping(self: Any) -> dict[str, Any]:
    return {"pong": True, **_where(self)}


@app.task(bind=True)
def download_dataset(self: Any, name: str, size_kb: int = 64) -> dict[str, Any]:
    payload = os.urandom(size_kb * 1024)
    return {"dataset": name, "bytes": len(payload), "sha256": _digest(payload, 1), **_where(self)}


@app.task(bind=True)
def tokenize(self: Any, text: str) -> dict[str, Any]:
    tokens = text.split()
    return {"tokens": len(tokens), "vocab": len(set(tokens)), **_where(self)}


@app.task(bind=True)
def train(self: Any, steps: int = 2000) -> dict[str, Any]:
    return {"steps": steps, "checkpoint": _digest(b"weights", steps), **_where(self)}


@app.task(bind=True)
def extract_features(self: Any, rows: int = 1000) -> dict[str, Any]:
    features = [_digest(str(i).encode(), 1)[:8] for i in range(rows)]
    return {"features": len(features), **_where(self)}


@app.task(bind=True)
def cleanup(self: Any) -> dict[str, Any]:
    return {"cleaned": True, **_where(self)}


@app.task(bind=True)
def sleep(self: Any, seconds: float) -> dict[str, Any]:
    """Hold a worker process busy, for restart and load tests."""
    time.sleep(seconds)
    return {"slept": seconds, **_where(self)}


@app.task(bind=True)
def tick(self: Any) -> dict[str, Any]:
    """The periodic task beat dispatches; a checker of duplicate and missing ticks.

    Every run is recorded in Redis as ``<dispatch time> <task id> <worker>
    <run time>``. The schedule is aligned to the clock, so the slot of a
    dispatch is ``floor(dispatch time / DEMO_TICK_SECONDS)``: two dispatches in
    one slot mean two beats sent it.
    """
    where = _where(self)
    now = time.time()
    dispatched = float(self.request.get(DISPATCHED_AT) or now)
    client = redis.Redis.from_url(app.conf.broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.rpush(TICKS_KEY, f"{dispatched:.3f} {self.request.id} {where['worker']} {now:.3f}")
        client.ltrim(TICKS_KEY, -5000, -1)
    finally:
        client.close()
    return where


# The task each queue is exercised with by the lab demo and the tests.
QUEUE_PROBES = {
    "high_priority": (ping, ()),
    "datasets": (download_dataset, ("demo",)),
    "processing": (tokenize, ("the quick brown fox jumps over the lazy dog the end",)),
    "training": (train, (500,)),
    "extraction": (extract_features, (200,)),
    "low_priority": (cleanup, ()),
}
